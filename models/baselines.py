"""Reference detectors every result is compared with: random scores, Isolation Forest, classic PCA and DBSCAN.

Both follow one contract, ``fit(X_train)`` then ``score(X) -> (n,)`` with higher meaning more anomalous.
Missing values (nan, ±inf, beyond `models.features.MAX_ABS_INPUT`) are replaced by the training column means, as
Isolation Forest cannot take them.

>>> import numpy as np
>>> X = np.random.default_rng(0).normal(size=(300, 2))
>>> forest = IsolationForestScores(seed=0).fit(X)
>>> bool(forest.score(np.array([[6.0, 6.0]]))[0] > np.median(forest.score(X)))
True
>>> RandomScores(seed=1).fit(X).score(X[:3]).shape
(3,)
>>> pca = PCAScores().fit(X @ np.array([[1.0, 1.0], [0.0, 0.1]]))
>>> bool(pca.score(np.array([[1.0, -1.0]]))[0] > pca.score(np.array([[1.0, 1.0]]))[0])
True
"""
from __future__ import annotations

import numpy as np

from models.features import usable


def _fill_missing(X: np.ndarray, column_means: np.ndarray) -> np.ndarray:
    X = np.array(X, dtype=np.float64, ndmin=2)
    missing = ~usable(X)  # NaN, ±inf and magnitudes whose squares would overflow count as missing
    if missing.any():
        X[missing] = np.broadcast_to(column_means, X.shape)[missing]
    return X


def _column_means(X_train: np.ndarray) -> np.ndarray:
    """Each column's mean over its usable values (0 if it has none): what a missing value is replaced by."""
    ok = usable(X_train)
    counts = ok.sum(axis=0)
    sums = np.where(ok, X_train, 0.0).sum(axis=0)
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


class RandomScores:
    """Uniform random scores, seeded: the chance level of every metric (ROC-AUC 0.5, PR-AUC = anomaly rate)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def fit(self, X_train: np.ndarray) -> "RandomScores":
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        return self.rng.random(len(X))


class IsolationForestScores:
    """Isolation Forest (Liu, Ting, Zhou 2008; scikit-learn) fit on one device's training data.

    Strong on readings that are far from the bulk in a few metrics; blind to anomalies that only show in time
    (it sees each reading alone). Score: the negated ``score_samples`` (higher = more anomalous).
    """

    def __init__(self, n_estimators: int = 100, seed: int = 0):
        self.n_estimators = n_estimators
        self.seed = seed
        self.forest = None
        self.column_means: np.ndarray | None = None

    def fit(self, X_train: np.ndarray) -> "IsolationForestScores":
        from sklearn.ensemble import IsolationForest
        X_train = np.asarray(X_train, dtype=np.float64)
        self.column_means = _column_means(X_train)
        self.forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed)
        self.forest.fit(_fill_missing(X_train, self.column_means))
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        if self.forest is None:
            raise RuntimeError("IsolationForestScores.score before fit")
        return -self.forest.score_samples(_fill_missing(X, self.column_means))


class PCAScores:
    """Classic PCA detector (Shyu et al., 2003): standardise each column with the training mean and deviation,
    keep the k principal components explaining `explained_variance` of the training variance, score a reading
    by its squared reconstruction error (summed over columns, not normalised per column). One reading at a
    time, fit once: the textbook baseline the online windowed subspace detector (`models.subspace`) extends.
    """

    def __init__(self, explained_variance: float = 0.9):
        self.explained_variance = float(explained_variance)
        self.column_means: np.ndarray | None = None

    def fit(self, X_train: np.ndarray) -> "PCAScores":
        X_train = np.asarray(X_train, dtype=np.float64)
        self.column_means = _column_means(X_train)
        X = _fill_missing(X_train, self.column_means)
        self.mean, std = X.mean(axis=0), X.std(axis=0)
        self.std = np.where(std > 1e-12, std, 1.0)
        values, vectors = np.linalg.eigh(np.cov(((X - self.mean) / self.std).T, bias=True).reshape(X.shape[1], -1))
        values, vectors = values[::-1], vectors[:, ::-1]
        explained = np.cumsum(values) / max(values.sum(), 1e-300)
        k = int(min(np.searchsorted(explained, self.explained_variance) + 1, len(values)))
        self.components = vectors[:, :k]
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        if self.column_means is None:
            raise RuntimeError("PCAScores.score before fit")
        Z = (_fill_missing(X, self.column_means) - self.mean) / self.std
        residual = Z - (Z @ self.components) @ self.components.T
        return (residual * residual).sum(axis=1)


class DBSCANScores:
    """`models.dbscan.DBSCANDetector` on standardised readings (distance to the nearest core point).

    Standardising with the training mean and deviation keeps one metric with a large range from deciding
    every distance.
    """

    def __init__(self, min_samples: int = 10, max_fit_points: int = 2000, seed: int = 0):
        from models.dbscan import DBSCANDetector
        from models.scaler import RunningScaler
        self.scaler = RunningScaler()
        self.detector = DBSCANDetector(min_samples=min_samples, max_fit_points=max_fit_points, seed=seed)

    def fit(self, X_train: np.ndarray) -> "DBSCANScores":
        X_train = np.asarray(X_train, dtype=np.float64)
        self.column_means = _column_means(X_train)
        X_train = _fill_missing(X_train, self.column_means)
        self.scaler.learn_many(X_train)
        self.detector.learn_many(self.scaler.transform_many(X_train))
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        return self.detector.score_many(self.scaler.transform_many(_fill_missing(X, self.column_means)))
