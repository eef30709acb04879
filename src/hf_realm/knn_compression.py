"""Compressing a kNN datastore (fewer bytes per entry) and the k-means under it.

- [`pca_compress`]: keys projected on their top principal components (faiss `PCAMatrix`; torch without faiss);
  queries are projected the same way at search.
- [`pq_compress`]: product quantisation (faiss `ProductQuantizer`, trained on the CPU), searched exactly over the
  reconstructions on the GPU (= faiss `IndexPQ` asymmetric distances).
- [`kmeans`] (from `hf_realm.search.kmeans`): seeded k-means (faiss `Kmeans` on the CPU, torch on the GPU), used by
  PQ without faiss and by [`~hf_realm.knn_pruning.cluster_prune`].

Every result is a function of the seed (see `hf_realm.search.kmeans`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .knn_datastore import KNNDatastore
from .search.faiss_utils import faiss_available, import_faiss
from .search.kmeans import _cluster_sums, _kmeans_init, _lloyd_step, kmeans  # noqa: F401 - the search layer's, kept here


Device = str | torch.device | None


def _default_device(device: Device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _sample_keys(datastore: KNNDatastore, size: int, seed: int, device: torch.device) -> torch.Tensor:
    n = len(datastore)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    return torch.from_numpy(np.asarray(datastore.keys[idx], dtype=np.float32)).to(device)


def _compressed(datastore: KNNDatastore, step: dict, keys, projection, pq: dict | None = None) -> KNNDatastore:
    """``datastore``'s entries (values, provenance, counts) with new keys or PQ codes; ``step`` joins the history."""
    meta = dict(datastore.metadata)
    meta["history"] = [*datastore.metadata.get("history", []), step]
    return KNNDatastore(keys=keys, values=datastore.values, provenance=datastore.provenance, counts=datastore.counts,
                        metadata=meta, projection=projection, pq=pq)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------------------------------


def _principal_components(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean `(d,)`, components `(d, d)` (columns, by decreasing variance) and variances `(d,)` of float32 ``sample``."""
    if faiss_available():
        faiss = import_faiss()
        pca = faiss.PCAMatrix(sample.shape[1], sample.shape[1])
        pca.max_points_per_d = max(1000, -(-sample.shape[0] // sample.shape[1]))  # fit on the whole sample
        pca.train(np.ascontiguousarray(sample))
        d = sample.shape[1]
        components = faiss.vector_to_array(pca.PCAMat).reshape(d, d).T.astype(np.float64)
        return faiss.vector_to_array(pca.mean).astype(np.float64), components, faiss.vector_to_array(pca.eigenvalues)
    # faiss is optional: the same decomposition in torch, float64
    x = torch.from_numpy(sample).double()
    mean = x.mean(0)
    centered = x - mean
    eigvals, eigvecs = torch.linalg.eigh(centered.T @ centered / max(1, x.shape[0] - 1))
    order = eigvals.argsort(descending=True)
    return mean.numpy(), eigvecs[:, order].numpy(), eigvals[order].numpy()


@torch.no_grad()
def pca_compress(
    datastore: KNNDatastore, dim: int, sample_size: int = 200_000, seed: int = 0, device: Device = None
) -> KNNDatastore:
    """Projects the keys on their top ``dim`` principal components (fit on up to ``sample_size`` keys on the CPU, with
    faiss `PCAMatrix` when faiss is installed; the projection of all keys runs on ``device``).

    Queries are projected the same way at search time (the store's `projection`), so squared distances are
    measured in the principal subspace. Composes with an existing projection.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_compression import pca_compress
    >>> keys = np.random.default_rng(0).normal(size=(100, 8)) * [5, 4, 3, 0, 0, 0, 0, 0]
    >>> small = pca_compress(KNNDatastore(keys=keys, values=np.arange(100)), 3)
    >>> small.key_dim, small.input_dim
    (3, 8)
    ```
    """
    if datastore.keys is None:
        raise ValueError("PCA needs float keys: apply it before product quantisation")
    if not 1 <= dim <= datastore.key_dim:
        raise ValueError(f"dim must be in [1, {datastore.key_dim}] (the key dim), got {dim}")
    device = _default_device(device)
    mean, components, variances = _principal_components(_sample_keys(datastore, sample_size, seed, "cpu").numpy())
    components = torch.from_numpy(components[:, :dim])
    # a deterministic sign per component (largest |entry| positive)
    components = components * torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    matrix = components.float().to(device)
    bias = -(torch.from_numpy(mean) @ components).float().to(device)
    new_keys = np.empty((len(datastore), dim), dtype=np.float16)
    for start in range(0, len(datastore), 1 << 18):
        chunk = torch.from_numpy(np.asarray(datastore.keys[start : start + (1 << 18)], dtype=np.float32)).to(device)
        new_keys[start : start + chunk.shape[0]] = torch.addmm(bias, chunk, matrix).cpu().numpy().astype(np.float16)
    if datastore.projection is not None:
        old_m = torch.from_numpy(datastore.projection["matrix"]).double()
        old_b = torch.from_numpy(datastore.projection["bias"]).double()
        m64, b64 = matrix.double().cpu(), bias.double().cpu()
        projection = {"matrix": (old_m @ m64).float().numpy(), "bias": (old_b @ m64 + b64).float().numpy()}
    else:
        projection = {"matrix": matrix.cpu().numpy(), "bias": bias.cpu().numpy()}
    explained = float(variances[:dim].sum() / max(float(variances.sum()), 1e-30))
    return _compressed(datastore, {"method": "pca", "dim": dim, "explained_variance": explained}, new_keys, projection)


# ----------------------------------------------------------------------------------------------------------------------
# Product quantisation
# ----------------------------------------------------------------------------------------------------------------------


def _pq_codebooks(sample: np.ndarray, m: int, nbits: int, iters: int, seed: int) -> tuple[np.ndarray, Any]:
    """`(m, 2^nbits, d / m)` codebooks trained on the CPU (small: a seed fixes them on every machine), and the trained
    faiss `ProductQuantizer` (`None` without faiss)."""
    d = sample.shape[1]
    ksub, dsub = 1 << nbits, d // m
    if faiss_available():
        faiss = import_faiss()
        pq = faiss.ProductQuantizer(d, m, nbits)
        pq.cp.niter, pq.cp.seed = iters, seed
        pq.cp.max_points_per_centroid, pq.cp.min_points_per_centroid = 1 << 30, 1  # all points, no warnings
        pq.train(np.ascontiguousarray(sample))
        return faiss.vector_to_array(pq.centroids).reshape(m, ksub, dsub), pq
    x = torch.from_numpy(sample)
    subs = [kmeans(x[:, j * dsub : (j + 1) * dsub].contiguous(), ksub, iters, seed + j)[0] for j in range(m)]
    return torch.stack(subs).numpy(), None


def _pq_encode_faiss(pq, keys: np.ndarray, m: int, nbits: int) -> np.ndarray:
    packed = pq.compute_codes(np.ascontiguousarray(keys, dtype=np.float32))
    if nbits == 8:
        return packed
    # faiss packs codes of fewer than 8 bits as one little-endian bit stream
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits].reshape(len(keys), m, nbits)
    return (bits.astype(np.uint8) << np.arange(nbits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


@torch.no_grad()
def pq_compress(
    datastore: KNNDatastore,
    m: int,
    nbits: int = 8,
    sample_size: int = 65_536,
    iters: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> KNNDatastore:
    """Product quantisation of the keys: ``m`` sub-spaces of `key_dim / m` dims, `2^nbits` centroids each.

    Each entry then costs ``m`` bytes instead of `2 * key_dim`. The codebooks are trained on a sample on the CPU (faiss
    `ProductQuantizer`, or [`kmeans`] without faiss), so a seed gives the same codebooks on every device; the keys are
    encoded by faiss on the CPU, or in torch on ``device`` when it is a GPU. The search decodes the codes chunk by chunk
    on the device and runs the exact search over the reconstructions (asymmetric distances, as faiss `IndexPQ`).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_realm.knn_datastore import KNNDatastore
    >>> from hf_realm.knn_compression import pq_compress
    >>> keys = np.random.default_rng(0).normal(size=(512, 8))
    >>> small = pq_compress(KNNDatastore(keys=keys, values=np.arange(512)), m=4, nbits=4)
    >>> small.pq["codes"].shape, small.keys is None
    ((512, 4), True)
    ```
    """
    if datastore.keys is None:
        raise ValueError("the datastore is already product-quantised")
    d = datastore.key_dim
    if m < 1 or d % m:
        raise ValueError(f"m={m} sub-quantisers must divide the key dim {d}")
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be in [1, 8], got {nbits}")
    device = _default_device(device)
    ksub, dsub = 1 << nbits, d // m
    sample = _sample_keys(datastore, sample_size, seed, "cpu").numpy()
    if sample.shape[0] < ksub:
        raise ValueError(f"{sample.shape[0]} keys cannot train {ksub} centroids per sub-space; lower nbits")
    codebooks_np, pq = _pq_codebooks(sample, m, nbits, iters, seed)
    codebooks = torch.from_numpy(codebooks_np).to(device)  # (m, ksub, dsub)
    codes = np.empty((len(datastore), m), dtype=np.uint8)
    cb_norm = codebooks.pow(2).sum(-1)  # (m, ksub)
    step = max(1, (1 << 27) // (m * ksub))  # bounds the (m, step, ksub) distance block to 512 MiB
    for start in range(0, len(datastore), step):
        keys = np.asarray(datastore.keys[start : start + step], dtype=np.float32)
        if pq is not None and device.type == "cpu":
            codes[start : start + keys.shape[0]] = _pq_encode_faiss(pq, keys, m, nbits)
            continue
        # on the GPU (faiss-gpu has no CUDA 13 wheels) or without faiss: nearest centroid per sub-space in torch
        sub = torch.from_numpy(keys).to(device).view(keys.shape[0], m, dsub).transpose(0, 1)  # (m, b, dsub)
        dist = cb_norm[:, None, :] - 2 * torch.bmm(sub, codebooks.transpose(1, 2))  # (m, b, ksub)
        codes[start : start + keys.shape[0]] = dist.argmin(-1).T.to(torch.uint8).cpu().numpy()
    pq_arrays = {"codes": codes, "codebooks": codebooks_np.astype(np.float32)}
    return _compressed(datastore, {"method": "pq", "m": m, "nbits": nbits}, None, datastore.projection, pq_arrays)


def compression_report(original: KNNDatastore, compressed: KNNDatastore) -> dict[str, Any]:
    """Entries and bytes of two stores, and their ratios."""
    return {
        "entries": len(compressed),
        "entries_fraction": len(compressed) / max(1, len(original)),
        "bytes": compressed.nbytes,
        "bytes_fraction": compressed.nbytes / max(1, original.nbytes),
        "compression": original.nbytes / max(1, compressed.nbytes),
        "bits_per_entry": 8 * compressed.nbytes / max(1, len(compressed)),
        "history": compressed.metadata.get("history", []),
    }


__all__ = ["compression_report", "kmeans", "pca_compress", "pq_compress"]
