"""SpRAy (Lapuschkin et al., 2019) on one group's heatmaps, as a short pipeline of plain functions.

    maps (n, s, s) -> flatten -> knn_affinity -> spectral_embedding -> eigengap_k -> kmeans -> view_2d

Defaults follow CoRelAy's spectral pipeline: Euclidean distances, a binary 10-nearest-neighbour
graph made symmetric as (A + A^T) / 2, the symmetric normalized Laplacian
L = I - D^-1/2 A D^-1/2, its 32 smallest eigenvalues, k-means on the spectral embedding, and a
2-D t-SNE of the embedding for the scatter plot. Every parameter is in ``SprayParams`` and is
written to ``summary.json``.

The number of clusters comes from the eigengap, measured as a ratio: with eigenvalues
0 = l_1 <= l_2 <= ..., r_i = (l_{i+1} + eps) / (l_i + eps) for 2 <= i <= max_clusters, with eps one
thousandth of the largest eigenvalue computed (eigenvalues shrink as a class has more maps). A
graph with k well-separated parts has k eigenvalues near 0 and then a jump, so r_k is large; k is
the i with the largest r_i when that is at least ``gap_ratio`` (3), and 1 otherwise. The plain
additive gap l_{i+1} - l_i is not used: heatmaps that vary continuously (an object anywhere in the
image) give a kNN graph whose eigenvalues rise steadily, and the largest additive gap then falls
at a random, large k. Their consecutive ratios stay near 1 to 2, which the threshold rejects.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SprayParams:
    size: int = 32  # maps are resampled to size x size (never above the stored resolution)
    neighbors: int = 10
    eigenvalues: int = 32
    max_clusters: int = 30  # the eigengap rule looks at k = 1 .. max_clusters
    gap_ratio: float = 3.0  # the smallest eigenvalue ratio that counts as a gap
    clusters: int | None = None  # a fixed k instead of the eigengap rule
    view: str = "tsne"  # tsne | umap | spectral
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


def knn_affinity(x: np.ndarray, neighbors: int):
    """Binary k-nearest-neighbour graph of the rows of ``x`` (Euclidean), symmetric: (A + A^T) / 2."""
    import scipy.sparse as sp
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    k = min(neighbors, n - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    # scikit-learn computes the distances in chunks of ``working_memory`` MB (1 GB by default).
    with sklearn.config_context(working_memory=64):
        _, idx = nn.kneighbors(x)
    # The first neighbour is usually the point itself, but duplicates can come first: drop self-edges.
    rows = np.repeat(np.arange(n), k + 1)
    cols = idx.reshape(-1)
    keep = rows != cols
    a = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n, n))
    a.data[:] = 1.0  # a point listed twice (duplicates) is still one edge
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


def kmeans(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on the rows of the first k eigenvectors, normalized to unit length (Ng, Jordan, Weiss)."""
    from sklearn.cluster import KMeans

    if k <= 1:
        return np.zeros(len(vectors), np.int64)
    u = vectors[:, :k]
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(u).astype(np.int64)


def view_2d(vectors: np.ndarray, view: str, *, perplexity: float, seed: int) -> tuple[np.ndarray, str]:
    """A 2-D embedding of the spectral embedding for the scatter plot; returns (xy, the view used)."""
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
    from sklearn.manifold import TSNE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tsne = TSNE(
            n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", max_iter=500, random_state=seed
        )
        return np.asarray(tsne.fit_transform(vectors), np.float64), "tsne"


def spray(maps: np.ndarray, params: SprayParams) -> SprayResult:
    """The whole SpRAy pipeline on (n, s, s) maps in [0, 1]."""
    n = len(maps)
    if n < 3:
        return SprayResult(np.zeros(n, np.int64), 1, np.zeros(min(n, 1)), 1, np.zeros((n, 2)), "none")
    x = maps.reshape(n, -1).astype(np.float64)
    lam, vecs = spectral_embedding(knn_affinity(x, params.neighbors), params.eigenvalues, params.seed)
    picked = eigengap_k(lam, params.max_clusters, params.gap_ratio)
    k = min(params.clusters, n) if params.clusters else picked
    labels = kmeans(vecs, k, params.seed)
    labels = _by_size(labels)
    xy, used = view_2d(vecs, params.view, perplexity=params.perplexity, seed=params.seed)
    return SprayResult(labels, int(labels.max()) + 1, lam, picked, xy, used)


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by size, largest first (ties by the old number), so numbering is stable."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = np.empty(int(ids.max()) + 1, np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]


__all__ = [
    "SprayParams",
    "SprayResult",
    "eigengap_k",
    "kmeans",
    "knn_affinity",
    "spectral_embedding",
    "spray",
    "view_2d",
]
