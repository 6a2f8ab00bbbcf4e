"""SpRAy (Lapuschkin et al., 2019) on one group's heatmaps, as a short pipeline of plain functions.

    maps (n, s, s) -> flatten -> knn_affinity -> spectral_embedding -> eigengap_k -> kmeans -> view_2d

The graph and the embedding follow CoRelAy's spectral pipeline: Euclidean distances, a binary
10-nearest-neighbour graph made symmetric as (A + A^T) / 2, the symmetric normalized Laplacian
L = I - D^-1/2 A D^-1/2 and its 32 smallest eigenvalues. Two choices differ from CoRelAy's
defaults on purpose (the README's "Auditing a model" says why): the maps are not normalized to
unit sum first, and k-means runs on the first k eigenvectors (rows scaled to unit length, as in
Ng, Jordan and Weiss), not on all 32. Every parameter is in ``SprayParams`` and is written to
``summary.json``.

The number of clusters comes from the eigengap, measured as a ratio: with eigenvalues
0 = l_1 <= l_2 <= ..., r_i = (l_{i+1} + eps) / (l_i + eps) for 2 <= i <= max_clusters, with eps one
thousandth of the largest eigenvalue computed (eigenvalues shrink as a class has more maps). A
graph with k well-separated parts has k eigenvalues near 0 and then a jump, so r_k is large; k is
the i with the largest r_i when that is at least ``gap_ratio`` (3), and 1 otherwise. The plain
additive gap l_{i+1} - l_i is not used: heatmaps that vary continuously (an object anywhere in the
image) give a kNN graph whose eigenvalues rise steadily, and the largest additive gap then falls
at a random, large k. Their consecutive ratios stay near 1 to 2, which the threshold rejects.

Besides the chosen k, ``spray`` clusters the same embedding for its neighbours (k - 1, k + 1) and
for k = 2..5, so the report can switch between them. The kNN search and k-means are numpy (BLAS
matrix products, every k-means start at once): an audit of a thousand small classes pays no
per-call overhead of a library. The 2-D view is t-SNE (openTSNE when installed, else
scikit-learn's), UMAP, or the spectral embedding's second and third eigenvectors; ``auto``
picks t-SNE only for audits small enough that it stays cheap (``resolve_view``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

VIEWS = ("auto", "tsne", "umap", "spectral")
# ``view="auto"`` computes t-SNE only while the whole audit stays small: t-SNE costs about 3 ms of
# CPU a map plus a tenth of a second a class, where the spectral view costs nothing. Past these,
# the spectral view (RESULTS.md, "Audit time").
AUTO_TSNE_MAPS = 5000  # maps SpRAy sees, all classes together
AUTO_TSNE_GROUPS = 50  # classes (x methods)
KNN_CHUNK_BYTES = 16 << 20  # the distance block of the kNN search (argpartition makes twice that in int64)


@dataclass(frozen=True)
class SprayParams:
    size: int = 32  # maps are resampled to size x size (never above the stored resolution)
    neighbors: int = 10
    eigenvalues: int = 32
    max_clusters: int = 30  # the eigengap rule looks at k = 1 .. max_clusters
    gap_ratio: float = 3.0  # the smallest eigenvalue ratio that counts as a gap
    clusters: int | None = None  # a fixed k instead of the eigengap rule
    view: str = "auto"  # auto | tsne | umap | spectral
    perplexity: float = 30.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SprayResult:
    labels: np.ndarray  # (n,) int: cluster of each map
    k: int
    eigenvalues: np.ndarray  # the Laplacian's smallest eigenvalues, ascending
    eigengap_k: int  # what the eigengap rule picked (equals k unless k was fixed)
    embedding: np.ndarray  # (n, 2) the 2-D view
    view: str  # the view actually used
    # Other clusterings of the same embedding, k -> (n,) labels (numbered by size); ``k`` is among them.
    clusterings: dict[int, np.ndarray] = field(default_factory=dict)


def knn_affinity(x: np.ndarray, neighbors: int):
    """Binary k-nearest-neighbour graph of the rows of ``x`` (Euclidean), symmetric: (A + A^T) / 2.

    Each row's ``neighbors`` nearest other rows, from squared distances |a|^2 + |b|^2 - 2 a.b in
    float32, a block of rows at a time (one BLAS product each). A point is never its own
    neighbour, duplicates included.
    """
    import scipy.sparse as sp

    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    k = min(neighbors, n - 1)
    if k < 1:
        return sp.csr_matrix((n, n))
    sq = np.einsum("ij,ij->i", x, x)
    step = max(1, KNN_CHUNK_BYTES // (4 * n))
    cols = np.empty((n, k), np.int64)
    for a in range(0, n, step):
        b = min(n, a + step)
        d = x[a:b] @ x.T
        d *= -2.0
        d += sq[None, :]
        d += sq[a:b, None]
        d[np.arange(b - a), np.arange(a, b)] = np.inf
        cols[a:b] = np.argpartition(d, k - 1, axis=1)[:, :k]
    a = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), cols.reshape(-1))), shape=(n, n))
    return (a + a.T) / 2.0


def spectral_embedding(affinity, n_eigenvalues: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The smallest eigenvalues of the symmetric normalized Laplacian and their eigenvectors.

    Computed as the largest eigenpairs of S = D^-1/2 A D^-1/2 (eigenvalue of L = 1 - that of S),
    where Lanczos converges fast. Returns (eigenvalues ascending, (n, m) eigenvectors).
    """
    import scipy.sparse as sp
    from scipy.linalg import eigh
    from scipy.sparse.linalg import eigsh

    n = affinity.shape[0]
    deg = np.asarray(affinity.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0))
    s = sp.diags(dinv) @ affinity @ sp.diags(dinv)
    m = min(n_eigenvalues, n)
    if n <= 600 or m >= n - 1:
        vals, vecs = eigh(s.toarray())
        vals, vecs = vals[::-1][:m], vecs[:, ::-1][:, :m]
    else:
        v0 = np.random.default_rng(seed).standard_normal(n)
        vals, vecs = eigsh(s, k=m, which="LA", v0=v0, tol=1e-8)
        order = np.argsort(-vals)
        vals, vecs = vals[order], vecs[:, order]
    lam = np.clip(1.0 - vals, 0.0, 2.0)
    return lam, vecs


EPS = 1e-3  # relative to the largest eigenvalue computed


def eigengap_k(eigenvalues: np.ndarray, max_clusters: int, gap_ratio: float = 3.0) -> int:
    """k = argmax r_i over 2 <= i <= min(max_clusters, m - 1) when that r_i >= ``gap_ratio``; else 1."""
    lam = np.sort(np.clip(np.asarray(eigenvalues, np.float64), 0, None))
    top = min(max_clusters, len(lam) - 1)
    if top < 2:
        return 1
    eps = max(EPS * float(lam[-1]), 1e-12)
    ratios = (lam[2 : top + 1] + eps) / (lam[1:top] + eps)  # r_2 .. r_top
    best = int(np.argmax(ratios))
    return best + 2 if ratios[best] >= gap_ratio else 1


def _sq_dist(u: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(r, n, k) squared distances of the n points ``u`` (n, d) to each start's k centres ``c`` (r, k, d)."""
    d = np.matmul(u, c.transpose(0, 2, 1))
    d *= -2.0
    d += np.einsum("nd,nd->n", u, u)[None, :, None]
    d += np.einsum("rkd,rkd->rk", c, c)[:, None, :]
    return np.maximum(d, 0.0, out=d)


def _kmeans_pp(u: np.ndarray, k: int, starts: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii), greedy with 2 + log k trials a step, for every start at once."""
    n = len(u)
    trials = 2 + int(np.log(k))
    r = np.arange(starts)
    c = np.empty((starts, k, u.shape[1]))
    c[:, 0] = u[rng.integers(0, n, starts)]
    closest = _sq_dist(u, c[:, :1])[:, :, 0]  # (r, n)
    for j in range(1, k):
        cum = np.cumsum(closest, axis=1)
        total = cum[:, -1:]
        draws = rng.random((starts, trials)) * np.where(total > 0, total, 1.0)
        cand = (cum[:, None, :] < draws[:, :, None]).sum(2).clip(0, n - 1)  # (r, t): inverse CDF draws
        d = _sq_dist(u, u[cand])  # (r, n, t)
        pot = np.minimum(closest[:, :, None], d).sum(1)  # (r, t)
        best = pot.argmin(1)
        c[:, j] = u[cand[r, best]]
        closest = np.minimum(closest, d[r, :, best])
    return c


def kmeans(
    vectors: np.ndarray, k: int, seed: int = 0, *, starts: int = 10, max_iter: int = 300, tol: float = 1e-4
) -> np.ndarray:
    """k-means on the rows of the first k eigenvectors, normalized to unit length (Ng, Jordan, Weiss).

    Lloyd's iterations from ``starts`` k-means++ seedings, all run at once, until no label moves
    or the centres move less than ``tol`` times the data's mean variance (scikit-learn's rule);
    the start with the lowest inertia wins (ties: the first). An emptied cluster keeps its centre.
    """
    n = len(vectors)
    if k <= 1 or n == 0:
        return np.zeros(n, np.int64)
    k = min(k, n)
    u = np.asarray(vectors[:, :k], np.float64)
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    c = _kmeans_pp(u, k, starts, rng)
    limit = tol * float(u.var(axis=0).mean())
    labels = np.full((starts, n), -1)
    onehot = np.zeros((starts, k, n))
    for _ in range(max_iter):
        new = _sq_dist(u, c).argmin(2)
        if np.array_equal(new, labels):
            break
        labels = new
        onehot[:] = 0.0
        np.put_along_axis(onehot, labels[:, None, :], 1.0, axis=1)
        counts = onehot.sum(2)  # (r, k)
        sums = np.matmul(onehot, u)  # (r, k, d)
        moved = np.where(counts[:, :, None] > 0, sums / np.maximum(counts, 1)[:, :, None], c)
        shift = ((moved - c) ** 2).sum(axis=(1, 2))
        c = moved
        if (shift <= limit).all():
            labels = _sq_dist(u, c).argmin(2)
            break
    inertia = np.take_along_axis(_sq_dist(u, c), labels[:, :, None], axis=2)[:, :, 0].sum(1)
    return labels[int(np.argmin(inertia))].astype(np.int64)


def other_ks(k: int, top: int) -> list[int]:
    """The clusterings the report can switch between: k, k - 1, k + 1 and 2..5, at most ``top``."""
    return sorted(j for j in {k - 1, k, k + 1, 2, 3, 4, 5} if 1 <= j <= top)


def resolve_view(view: str, maps: int, groups: int) -> tuple[str, str | None]:
    """The view for an audit of ``maps`` maps in ``groups`` groups, and, for ``auto``, a sentence that says why."""
    if view != "auto":
        return view, None
    if maps <= AUTO_TSNE_MAPS and groups <= AUTO_TSNE_GROUPS:
        return "tsne", None
    return "spectral", (
        f"2-D view: spectral (the second and third eigenvectors), since SpRAy sees {maps:,} maps in {groups:,} "
        f"classes, more than the {AUTO_TSNE_MAPS:,} maps or {AUTO_TSNE_GROUPS} classes up to which --view auto "
        "computes t-SNE; --view tsne computes it anyway"
    )


def tsne_library() -> str:
    """The library that computes t-SNE here: openTSNE when installed, else scikit-learn."""
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        return "scikit-learn"
    return "openTSNE"


def _tsne(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    perplexity = min(perplexity, (len(x) - 1) / 3)
    if tsne_library() == "openTSNE":
        from openTSNE import TSNE as OpenTSNE

        # 250 early-exaggeration and 250 more iterations: scikit-learn's max_iter=500 below.
        tsne = OpenTSNE(
            n_components=2,
            perplexity=perplexity,
            early_exaggeration_iter=250,
            n_iter=250,
            initialization="pca",
            n_jobs=1,
            random_state=seed,
            verbose=False,
        )
        return np.asarray(tsne.fit(x), np.float64)
    from sklearn.manifold import TSNE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed)
        return np.asarray(tsne.fit_transform(x), np.float64)


def view_2d(vectors: np.ndarray, view: str, *, perplexity: float, seed: int) -> tuple[np.ndarray, str]:
    """A 2-D embedding of the spectral embedding for the scatter plot; returns (xy, the view used).

    ``view`` is tsne, umap or spectral (``resolve_view`` turns auto into one of them; here auto is
    t-SNE). UMAP without umap-learn is t-SNE; the view returned says so.
    """
    n = len(vectors)
    if n < 5 or view == "spectral":
        xy = vectors[:, 1:3] if vectors.shape[1] >= 3 else np.pad(vectors, ((0, 0), (0, 3 - vectors.shape[1])))[:, 1:3]
        return np.asarray(xy, np.float64), "spectral"
    if view == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            view = "tsne"
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1))
            return np.asarray(reducer.fit_transform(vectors), np.float64), "umap"
    return _tsne(vectors, perplexity, seed), "tsne"


def spray(maps: np.ndarray, params: SprayParams) -> SprayResult:
    """The whole SpRAy pipeline on (n, s, s) maps in [0, 1]."""
    n = len(maps)
    if n < 3:
        zeros = np.zeros(n, np.int64)
        return SprayResult(zeros, 1, np.zeros(min(n, 1)), 1, np.zeros((n, 2)), "none", {1: zeros})
    x = maps.reshape(n, -1)
    lam, vecs = spectral_embedding(knn_affinity(x, params.neighbors), params.eigenvalues, params.seed)
    picked = eigengap_k(lam, params.max_clusters, params.gap_ratio)
    k = min(params.clusters, n) if params.clusters else picked
    clusterings = {j: _by_size(kmeans(vecs, j, params.seed)) for j in other_ks(k, n)}
    labels = clusterings[k]
    xy, used = view_2d(vecs, params.view, perplexity=params.perplexity, seed=params.seed)
    return SprayResult(labels, int(labels.max()) + 1, lam, picked, xy, used, clusterings)


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by size, largest first (ties by the old number), so numbering is stable."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = np.empty(int(ids.max()) + 1, np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]


__all__ = [
    "AUTO_TSNE_GROUPS",
    "AUTO_TSNE_MAPS",
    "VIEWS",
    "SprayParams",
    "SprayResult",
    "eigengap_k",
    "kmeans",
    "knn_affinity",
    "other_ks",
    "resolve_view",
    "spectral_embedding",
    "spray",
    "tsne_library",
    "view_2d",
]
