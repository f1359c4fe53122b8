"""DBSCAN as an anomaly detector over vectors such as per-device reconstruction errors."""
from __future__ import annotations

import numpy as np

CHUNK_ROWS = 1024  # rows of the distance matrix computed at once when scoring (bounds memory to ~16 MB)


def _distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of A and of B."""
    sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.sqrt(np.maximum(sq, 0.0))


class DBSCANDetector:
    """Points outside every dense cluster are anomalies (Ester et al., KDD 1996).

    A *core* point has at least `min_samples` points (itself included) within `eps`; clusters are core points
    linked through such neighbourhoods plus their border points; everything else is noise. The anomaly score of
    a point is its distance to the nearest core point, so score > `eps_` means "noise" and the score can be
    ranked (ROC-AUC). Good when normal behaviour forms a few dense regimes of any shape; bad when the normal
    data have very different densities (one `eps` fits all) or in high dimension, where distances concentrate.

    The fit is O(m²) in time and memory, so it runs on a uniform reservoir sample of at most `max_fit_points`
    of the learned points, refitted lazily when scores are asked for after new data.

    Parameters
    ----------
    eps
        Neighbourhood radius; ``None`` takes the `eps_quantile` quantile of the distance to the
        `min_samples`-th nearest neighbour (the "k-distance" heuristic of the paper).
    min_samples
        Points within `eps` (itself included) that make a core point.
    max_fit_points
        Size of the reservoir sample the clusters are fitted on.
    eps_quantile
        Quantile of the k-distances used for the automatic `eps`.
    seed
        Seed of the reservoir sampling.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> normal = np.vstack([rng.normal(0, 0.1, (300, 2)), rng.normal(3, 0.1, (300, 2))])
    >>> det = DBSCANDetector(min_samples=10)
    >>> det.learn_many(normal)
    >>> det.predict_many(np.array([[0.0, 0.0], [3.0, 3.0], [1.5, 1.5]])).tolist()
    [False, False, True]
    >>> int(det.labels_.max()) + 1   # clusters found
    2
    """

    def __init__(self, eps: float | None = None, min_samples: int = 10, max_fit_points: int = 2000,
                 eps_quantile: float = 0.95, seed: int = 7):
        self.eps = eps
        self.min_samples = int(min_samples)
        self.max_fit_points = int(max_fit_points)
        self.eps_quantile = float(eps_quantile)
        self._rng = np.random.default_rng(seed)
        self._sample: np.ndarray | None = None
        self.n_seen = 0
        self._stale = True
        self.eps_: float = np.inf         # radius in use after fitting
        self.core_points_: np.ndarray | None = None
        self.labels_: np.ndarray | None = None  # cluster of each sampled point, -1 = noise

    def learn_one(self, x: np.ndarray) -> None:
        self.learn_many(np.asarray(x, dtype=np.float64)[None, :])

    def learn_many(self, X: np.ndarray) -> None:
        """Add points to the reservoir sample (Vitter's algorithm R)."""
        X = np.array(X, dtype=np.float64, ndmin=2)
        if self._sample is None:
            self._sample = np.empty((0, X.shape[1]))
        take = max(0, min(self.max_fit_points - self._sample.shape[0], X.shape[0]))
        self._sample = np.vstack([self._sample, X[:take]])
        self.n_seen += take
        for x in X[take:]:
            self.n_seen += 1
            j = self._rng.integers(0, self.n_seen)
            if j < self.max_fit_points:
                self._sample[j] = x
        self._stale = True

    def fit(self) -> None:
        """Find core points and clusters in the current sample."""
        P = self._sample
        if P is None or P.shape[0] == 0:
            raise ValueError("DBSCANDetector: nothing learned yet; call learn_many first")
        D = _distances(P, P)
        k = min(self.min_samples, P.shape[0]) - 1
        self.eps_ = float(self.eps) if self.eps is not None else float(
            np.quantile(np.partition(D, k, axis=1)[:, k], self.eps_quantile))
        neighbours = D <= self.eps_
        core = neighbours.sum(axis=1) >= self.min_samples
        labels = np.full(P.shape[0], -1)
        cluster = 0
        for seed_point in np.flatnonzero(core):
            if labels[seed_point] != -1:
                continue
            frontier = np.array([seed_point])
            labels[seed_point] = cluster
            while frontier.size:  # expand through core points; border points join but do not expand
                reached = neighbours[frontier].any(axis=0) & (labels == -1)
                labels[reached] = cluster
                frontier = np.flatnonzero(reached & core)
            cluster += 1
        self.core_points_ = P[core]
        self.labels_ = labels
        self._stale = False

    def score_many(self, X: np.ndarray) -> np.ndarray:
        """Distance of each point to the nearest core point (inf if there is none)."""
        if self._stale:
            self.fit()
        X = np.array(X, dtype=np.float64, ndmin=2)
        if self.core_points_.shape[0] == 0:
            return np.full(X.shape[0], np.inf)
        return np.concatenate([_distances(X[i:i + CHUNK_ROWS], self.core_points_).min(axis=1)
                               for i in range(0, X.shape[0], CHUNK_ROWS)])

    def score_one(self, x: np.ndarray) -> float:
        return float(self.score_many(np.asarray(x, dtype=np.float64)[None, :])[0])

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        """True where a point lies outside every cluster (noise)."""
        return self.score_many(X) > self.eps_
