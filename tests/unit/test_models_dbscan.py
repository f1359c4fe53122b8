"""DBSCANDetector: noise points score high, clusters found, sampling bounds the fit."""
import numpy as np

from models.dbscan import DBSCANDetector


def test_outliers_rank_above_cluster_points():
    rng = np.random.default_rng(0)
    normal = np.vstack([rng.normal(0, 0.1, (1500, 3)), rng.normal(2, 0.1, (1500, 3))])
    outliers = rng.uniform(4, 6, (20, 3))
    det = DBSCANDetector(max_fit_points=1000, seed=1)
    det.learn_many(normal)
    assert det.core_points_ is None or det.core_points_.shape[0] <= 1000
    scores = det.score_many(np.vstack([normal[:200], outliers]))
    assert scores[200:].min() > scores[:200].max()
    assert det.predict_many(outliers).all() and det.predict_many(normal).mean() < 0.05
    assert det.labels_.shape == (1000,) and det.labels_.max() == 1


def test_fixed_eps_and_refit_after_learning():
    det = DBSCANDetector(eps=0.5, min_samples=3)
    det.learn_many(np.zeros((5, 2)))
    assert det.predict_many(np.array([[1.0, 0.0]])).tolist() == [True]
    det.learn_many(np.full((5, 2), [1.0, 0.0]))
    assert det.predict_many(np.array([[1.0, 0.0]])).tolist() == [False]
