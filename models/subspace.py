"""Online linear-subspace (PCA) model: a low-rank covariance with exponential forgetting, updated per batch."""
from __future__ import annotations

import math

import numpy as np
from numpy.linalg import _umath_linalg as _lapack  # np.linalg's own LAPACK kernels (see `_eigh`)

from models.autoencoder import check_weight_shapes, checked_rows

LEARN_CHUNK = 64       # rows per learning step: larger batches are learned in steps of this many rows
NEW_DIRECTIONS = 4     # directions a learning step may add to the tracked subspace (see `SubspaceModel._step`)
_SKETCHES: dict[int, np.ndarray] = {}  # fixed ±1 sketch matrices by number of rows (deterministic learning)
_AGES: dict[tuple[float, int], tuple[np.ndarray, float, np.ndarray]] = {}  # forgetting weights of a batch:
#                                      (λ^(b-1), ..., λ, 1), their sum, their square roots as a column
MIN_ROW_WEIGHT = 1e-9  # a row's weight in `learn_many` is at least this (a batch never weighs nothing)
CHOLESKY_QR_MIN_RATIO = 1e-3  # `orthonormal_columns` takes Householder QR below this ratio of Cholesky diagonals


def batch_weights(forgetting: float, rows: int) -> tuple[np.ndarray, float, np.ndarray]:
    """The weights of `rows` readings learned together, oldest first (the newest weighs 1, each older one
    `forgetting` times the next), their sum and their square roots as a (rows, 1) column; cached (batches come in
    a few sizes, and each learning step needs them). Do not modify the results."""
    key = (forgetting, rows)
    cached = _AGES.get(key)
    if cached is None:
        if len(_AGES) > 256:
            _AGES.clear()
        w = forgetting ** np.arange(rows - 1, -1, -1, dtype=np.float64)
        cached = _AGES[key] = (w, float(w.sum()), np.sqrt(w)[:, None])
    return cached


def age_weights(forgetting: float, rows: int) -> np.ndarray:
    """`batch_weights`' weights alone. Do not modify the result."""
    return batch_weights(forgetting, rows)[0]


def _eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.linalg.eigh(a)` of a symmetric float64 matrix (eigenvalues ascending), by the same LAPACK kernel without
    the wrapper's per-call checks (a few µs, a sizeable share of a micro-batch's learning step): identical results.
    Raises `np.linalg.LinAlgError` if it does not converge (NaN results), as `np.linalg.eigh` does."""
    with np.errstate(invalid="ignore"):
        values, vectors = _lapack.eigh_lo(a, signature="d->dd")
    if not math.isfinite(values[0]):  # ascending: a NaN anywhere is one nowhere else when the kernel succeeded
        raise np.linalg.LinAlgError(f"eigendecomposition of a {a.shape[0]}×{a.shape[0]} matrix did not converge")
    return values, vectors


def qr_factors(E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``E = Q R``: Q (d, m) with orthonormal columns spanning the m columns of `E` (m small), R (m, m).

    Cholesky QR (``R = Lᵀ``, ``Q = E L⁻ᵀ`` with ``L Lᵀ = EᵀE``: a few m×m operations) when the columns are well
    conditioned, else Householder QR. Same span, same accuracy at this conditioning (orthogonality error ≈ machine
    epsilon × (max/min Cholesky diagonal)², ≤ 1e-9 here, far below the float32 basis the model keeps);
    `np.linalg.qr` costs several times more per call, and a learning step of a micro-batch is small enough for that
    to matter. The Cholesky factor and its inverse come from np.linalg's own kernels, without its wrappers (as in
    `_eigh`)."""
    with np.errstate(invalid="ignore"):  # not positive definite: NaN on the diagonal, caught below
        factor = _lapack.cholesky_lo(E.T @ E, signature="d->d")
    diagonal = factor.diagonal().tolist()
    smallest = min(diagonal)
    # (numerically) dependent or ill-conditioned columns: Householder still gives orthonormal ones
    if not smallest > CHOLESKY_QR_MIN_RATIO * max(diagonal):  # also NaN (Cholesky failed)
        return np.linalg.qr(E)
    return E @ _lapack.inv(factor, signature="d->d").T, factor.T


def orthonormal_columns(E: np.ndarray) -> np.ndarray:
    """An orthonormal basis (d, m) of the m columns of `E` (`qr_factors`' Q)."""
    return qr_factors(E)[0]


def forgetting_factor(half_life: float) -> float:
    """Weight kept per reading so that a reading's weight halves every `half_life` readings (0: no forgetting)."""
    if half_life < 0:
        raise ValueError(f"model.subspace.half_life must be >= 0 readings (0: no forgetting), got {half_life}")
    return 1.0 if half_life == 0 else 0.5 ** (1.0 / half_life)


def _sketch(rows: int) -> np.ndarray:
    """A fixed (rows, NEW_DIRECTIONS) matrix of random signs: random combinations of a batch's residual rows
    capture its dominant directions (Halko, Martinsson & Tropp, 2011); fixed, so learning is deterministic."""
    if rows not in _SKETCHES:
        _SKETCHES[rows] = np.random.default_rng(rows).choice([-1.0, 1.0], size=(rows, NEW_DIRECTIONS))
    return _SKETCHES[rows]


class SubspaceModel:
    """Keep a device's readings' mean and the top `rank` eigenpairs of their covariance, with forgetting; score a
    reading by how far it lies from the subspace of the top k components.

    k is the fewest components whose eigenvalues explain `explained_variance` of the total variance, measured
    against the exact trace (a per-dimension variance is kept beside the low-rank factor). The residual — what
    the k components cannot reconstruct — is the anomaly signal: a reading that breaks the usual correlations
    between its inputs (one metric off while its peers are normal; over a window of readings, also a broken
    rhythm) has a large residual. Linear and cheap, it beats deep reconstruction models on server telemetry
    without point adjustment (Schmidl et al., VLDB 2022; Liu & Paparrizos, TSB-AD, NeurIPS 2024); it cannot
    model non-linear structure, and what lies inside the subspace (a large but correlated excursion) scores low.

    Learning is an incremental truncated eigendecomposition (in the spirit of Ross et al., IJCV 2008, with
    forgetting): each batch of at most `LEARN_CHUNK` rows decays the old statistics by ``λ^b`` (λ from
    `half_life`), adds the batch's weighted scatter and the mean-shift term of merging two groups, and
    re-diagonalises in the tracked basis extended by `NEW_DIRECTIONS` directions that sketch the batch's
    residual. With ``rank`` ≥ the number of inputs it is exact: the covariance equals NumPy's weighted one.
    State is O(d·rank), never a d×d matrix.

    Parameters
    ----------
    explained_variance
        Share of the variance the scoring components explain (0.90: the usual rule of thumb).
    rank
        Components tracked (capped at the number of inputs); keep it above the k you expect.
    half_life
        Readings after which a reading's weight in the mean and covariance has halved; 0 keeps everything.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(2000, 2)) @ np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    >>> X += 0.05 * rng.normal(size=(2000, 3))
    >>> model = SubspaceModel(explained_variance=0.9, rank=3, half_life=0)
    >>> model.learn_many(X)
    >>> model.k, np.allclose(model.covariance, np.cov(X.T, bias=True))
    (2, True)
    >>> bool(model.score_one(np.array([1.0, -1.0, 1.0])) > 100 * model.score_many(X).mean())
    True
    """

    def __init__(self, explained_variance: float = 0.9, rank: int = 16, half_life: float = 0.0):
        if not 0.0 < explained_variance <= 1.0:
            raise ValueError(f"model.subspace.explained_variance must be in (0, 1], got {explained_variance}")
        if rank < 1:
            raise ValueError(f"model.subspace.rank must be >= 1, got {rank}")
        self.explained_variance = float(explained_variance)
        self.rank = int(rank)
        self.set_half_life(half_life)
        self.n_features: int | None = None
        self.weight = 0.0               # total weight of the readings learned (≈ their count, after forgetting)
        self.n_seen = 0
        self.mean = np.zeros(0)
        self.scatter_diag = np.zeros(0)  # weighted sum of squared deviations per input: the exact trace
        self.basis = np.zeros((0, 0), dtype=np.float32)  # (d, r) orthonormal eigenvectors, largest first
        self.eigenvalues = np.zeros(0)   # (r,) of the weighted scatter matrix (covariance × weight)
        self.k = 0
        self.global_share = 0.0          # share of the statistics' weight adopted from global models (federation)
        self._scoring_basis: np.ndarray | None = None
        self._stretch: np.ndarray | None = None  # (d,) a `rescale` the low-rank part has not taken yet

    def set_half_life(self, half_life: float) -> None:
        """Forget at this half-life (readings; 0: never) from the next reading on; what was learned stays."""
        self.half_life = float(half_life)
        self.forgetting = forgetting_factor(self.half_life)

    @property
    def architecture(self) -> str:
        """``subspace/<inputs>/r<rank>``: equal strings, compatible weights."""
        return f"subspace/{self.n_features}/r{self.basis.shape[1]}"

    def initialize(self, n_features: int) -> None:
        d = int(n_features)
        r = min(self.rank, d)
        self.n_features = d
        self.mean = np.zeros(d)
        self.scatter_diag = np.zeros(d)
        self.basis = np.eye(d, r, dtype=np.float32)
        self.eigenvalues = np.zeros(r)
        self.weight, self.n_seen, self.k, self.global_share = 0.0, 0, 0, 0.0
        self._scoring_basis = self._stretch = None

    def _ensure(self, X: np.ndarray) -> np.ndarray:
        if type(X) is np.ndarray and X.dtype == np.float64 and X.ndim == 2 and X.shape[1] == self.n_features:
            return X  # the usual case (the detector's rows), without a copy: rows are read, never kept or changed
        return checked_rows(self, X)

    # -- statistics -----------------------------------------------------------------------------------------------

    @property
    def variances(self) -> np.ndarray:
        """Variance of each input (exact, with forgetting)."""
        return self.scatter_diag / self.weight if self.weight > 0 else np.zeros_like(self.scatter_diag)

    @property
    def covariance(self) -> np.ndarray:
        """The rank-r covariance with the exact diagonal (what the model knows), (d, d). For tests and federation."""
        self._settle()
        U = self.basis.astype(np.float64)
        C = (U * (self.eigenvalues / max(self.weight, 1e-300))) @ U.T
        C[np.diag_indices_from(C)] = self.variances
        return C

    @property
    def explained_ratio(self) -> float:
        """Share of the total variance the k scoring components explain."""
        self._settle()
        total = float(self.scatter_diag.sum())
        return float(self.eigenvalues[:self.k].sum()) / total if total > 0 else 0.0

    @property
    def rank_bound(self) -> bool:
        """Whether the tracked components are too few for the rule: every one of them scores (k = rank, fewer than
        the inputs) and together they explain less than `explained_variance`. The rest of the variance then counts
        as residual; a larger ``model.subspace.rank`` gives k its due (state and snapshots grow with it)."""
        tracked = self.basis.shape[1]
        return (self.weight > 0 and tracked < (self.n_features or 0)
                and self.explained_ratio < self.explained_variance * (1 - 1e-12))

    def _choose_k(self) -> None:
        total = float(self.scatter_diag.sum())
        if total <= 0:
            self.k = 0
        else:
            explained = np.cumsum(self.eigenvalues) / total
            self.k = int(min(np.searchsorted(explained, self.explained_variance * (1 - 1e-12)) + 1,
                             len(self.eigenvalues)))
        self._scoring_basis = None

    # -- learning -------------------------------------------------------------------------------------------------

    def learn_one(self, x: np.ndarray) -> None:
        self.learn_many(x)

    def learn_many(self, X: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Learn the rows in order, in steps of at most `LEARN_CHUNK` rows; each row weighs 1 when learned, or its
        entry of `weights` (in (0, 1]: a bounded-influence learner's down-weighting of outlying rows)."""
        X = self._ensure(X)
        for start in range(0, X.shape[0], LEARN_CHUNK):
            self._step(X[start:start + LEARN_CHUNK], None if weights is None else weights[start:start + LEARN_CHUNK])
        self.n_seen += X.shape[0]
        self._choose_k()

    def _step(self, X: np.ndarray, weights: np.ndarray | None = None) -> None:
        b, d = X.shape
        lam = self.forgetting
        w, batch_weight, root_w = batch_weights(lam, b)  # the newest row weighs 1
        if weights is not None:
            w = w * np.clip(weights, MIN_ROW_WEIGHT, 1.0)
            batch_weight, root_w = float(w.sum()), np.sqrt(w)[:, None]
        decay = lam ** b
        old_weight = self.weight * decay
        new_weight = old_weight + batch_weight
        batch_mean = np.dot(w, X) / batch_weight
        # Rows whose scatter is the batch's contribution: weighted centred rows, and the mean-shift term of merging
        # two groups, W_old·W_b/W · (μ_old − μ_b)(μ_old − μ_b)ᵀ (Chan et al.'s parallel variance for matrices).
        rows = np.empty((b + 1, d))
        centred = np.subtract(X, batch_mean, out=rows[:b])
        np.multiply(centred, root_w, out=centred)
        rows[b] = math.sqrt(old_weight * batch_weight / new_weight) * (self.mean - batch_mean)
        self.mean = (old_weight * self.mean + batch_weight * batch_mean) / new_weight
        self.scatter_diag = decay * self.scatter_diag + np.einsum("ij,ij->j", rows, rows)
        self.global_share *= old_weight / new_weight
        U, old_scatter = self._stretched()
        r = U.shape[1]
        if self.weight == 0.0:  # first step: an orthonormal basis spanning the batch (and filling up to r)
            basis = np.linalg.qr(np.hstack([rows.T, np.eye(d, r)]))[0]
        elif r < d:  # the tracked basis, extended by a sketch of what it cannot reconstruct in this batch
            sketch = _sketch(b + 1)[:, :d - r]
            extension = rows.T @ sketch - U @ ((rows @ U).T @ sketch)  # (rows − rows U Uᵀ)ᵀ · sketch
            extension -= U @ (U.T @ extension)  # again: U is float32, so only nearly orthonormal
            basis = np.concatenate([U, orthonormal_columns(extension)], axis=1)
        else:  # the tracked basis is complete: the update is exact
            basis = U
        projected = rows @ basis
        gram = projected.T @ projected
        if old_scatter is not None:  # after a rescale: the old scatter in the basis U = Q of A·U_before
            gram[:r, :r] += decay * old_scatter
        elif self.weight > 0.0:  # the decayed eigenvalues on the first r diagonal entries (a strided view)
            gram.reshape(-1)[:r * (gram.shape[0] + 1):gram.shape[0] + 1] += decay * self.eigenvalues
        values, vectors = _eigh(gram)
        top = np.arange(values.shape[0] - 1, values.shape[0] - r - 1, -1)  # the r largest, largest first
        self.basis = (basis @ vectors[:, top]).astype(np.float32)  # (a copy: matmul of a reversed view is slow)
        self.eigenvalues = np.maximum(values[top], 0.0)
        self.weight = new_weight

    def rebaseline(self, max_weight: float) -> None:
        """Let recent readings dominate: scale the statistics down to a weight of at most `max_weight` readings."""
        if self.weight > max_weight > 0:
            shrink = max_weight / self.weight
            self.eigenvalues = self.eigenvalues * shrink
            self.scatter_diag = self.scatter_diag * shrink
            self.weight = float(max_weight)

    # -- scoring --------------------------------------------------------------------------------------------------

    def residuals(self, X: np.ndarray) -> np.ndarray:
        """What the k components cannot reconstruct of each row, (n, d)."""
        X = self._ensure(X)
        self._settle()
        if self._scoring_basis is None:
            self._scoring_basis = self.basis[:, :self.k].astype(np.float64)
        centred = X - self.mean
        P = self._scoring_basis
        return centred - np.dot(np.dot(centred, P), P.T)

    def feature_errors(self, X: np.ndarray) -> np.ndarray:
        """Squared residual of every input, (n, d)."""
        R = self.residuals(X)
        return np.multiply(R, R, out=R)

    def score_many(self, X: np.ndarray) -> np.ndarray:
        """Mean squared residual per row (the detector divides each input by its typical residual first)."""
        return self.feature_errors(X).mean(axis=1)

    def score_one(self, x: np.ndarray) -> float:
        return float(self.score_many(x)[0])

    # -- federation and persistence -----------------------------------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        """What a snapshot carries, float32: the covariance factor L (d, r) with ``L Lᵀ`` the rank-r covariance,
        the mean (d,) and each input's variance (d,) (the exact diagonal)."""
        self._settle()
        scale = np.sqrt(self.eigenvalues / self.weight) if self.weight > 0 else np.zeros_like(self.eigenvalues)
        return [(self.basis * scale).astype(np.float32), self.mean.astype(np.float32),
                self.variances.astype(np.float32)]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Take a factor, mean and variances (`get_weights`' layout) as this model's statistics, keeping its weight
        (a fresh model takes them as worth as many readings as it has inputs)."""
        factor, mean, var = (np.asarray(w, dtype=np.float64) for w in weights)
        if self.n_features is None:
            self.initialize(mean.shape[0])
        check_weight_shapes([np.zeros(self.basis.shape), self.mean, self.scatter_diag], [factor, mean, var])
        if self.weight <= 0.0:
            self.weight = float(self.n_features)
        norms = np.sqrt(np.einsum("ij,ij->j", factor, factor))
        order = np.argsort(norms)[::-1]
        norms, factor = norms[order], factor[:, order]
        safe = np.where(norms > 0, norms, 1.0)
        basis = factor / safe
        if (norms == 0).any():  # complete a rank-deficient factor with an orthonormal basis
            basis = np.linalg.qr(np.hstack([basis[:, norms > 0], np.eye(*basis.shape)]))[0][:, :basis.shape[1]]
        self.basis = basis.astype(np.float32)
        self.eigenvalues = norms * norms * self.weight
        self._stretch = None
        self.mean = mean.copy()
        self.scatter_diag = np.maximum(var, 0.0) * self.weight
        self._choose_k()

    def rescale(self, a: np.ndarray, c: np.ndarray) -> None:
        """Re-express what was learned for inputs that change units, ``x → a·x + c`` per input (the detector's
        scaler moved after a batch): the mean maps to ``a·mean + c``, the scatter to ``A S A`` (A = diag(a)).
        Learning rows and then rescaling equals learning the rows in the new units (exactly when ``rank`` covers
        every input), so the statistics always describe every reading learned in the units the next ones are
        scored in. The low-rank part is re-diagonalised by the next learning step, in the basis it builds anyway
        (``A U = Q R``: the old scatter is ``Q R Λ Rᵀ Qᵀ``), or by the next reader of the model (`_settle`)."""
        if self.weight <= 0.0:
            return
        self.mean = a * self.mean + c
        self.scatter_diag = a * a * self.scatter_diag
        self._stretch = a if self._stretch is None else self._stretch * a

    def _stretched(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The tracked basis (float64) and, after a `rescale`, the old scatter in it (r×r, ``R Λ Rᵀ``; None:
        ``diag(eigenvalues)``)."""
        U = self.basis.astype(np.float64)
        if self._stretch is None:
            return U, None
        Q, R = qr_factors(U * self._stretch[:, None])
        self._stretch = None
        return Q, (R * self.eigenvalues) @ R.T

    def _settle(self) -> None:
        """Re-diagonalise the low-rank part after a `rescale` that no learning step followed."""
        if self._stretch is not None:
            Q, scatter = self._stretched()
            values, vectors = _eigh(scatter)
            top = np.arange(values.shape[0] - 1, -1, -1)
            self.basis = (Q @ vectors[:, top]).astype(np.float32)
            self.eigenvalues = np.maximum(values[top], 0.0)
            self._choose_k()

    def get_state(self) -> list[np.ndarray]:
        """Everything `set_state` needs: basis (float32), eigenvalues, mean, scatter diagonal, counters."""
        self._settle()
        return [self.basis.copy(), self.eigenvalues.copy(), self.mean.copy(), self.scatter_diag.copy(),
                np.array([self.weight, self.n_seen, self.global_share])]

    def set_state(self, arrays: list[np.ndarray]) -> None:
        basis, eigenvalues, mean, scatter_diag, counters = arrays
        self.n_features = int(mean.shape[0])
        self.basis = np.asarray(basis, dtype=np.float32).reshape(self.n_features, -1).copy()
        self.eigenvalues = np.array(eigenvalues, dtype=np.float64)
        self.mean = np.array(mean, dtype=np.float64)
        self.scatter_diag = np.array(scatter_diag, dtype=np.float64)
        self.weight, self.n_seen, self.global_share = float(counters[0]), int(counters[1]), float(counters[2])
        self._stretch = None
        self._choose_k()
