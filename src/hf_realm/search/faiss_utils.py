"""faiss is optional: imported lazily, with an install hint when missing."""

from __future__ import annotations


def import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "this index backend needs faiss: `pip install faiss-cpu` (or `pip install hf_realm[faiss]`; "
            "`faiss-gpu-cu12` for GPU indexes), or use backend='torch' (exact search in torch, no faiss)"
        ) from err
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    try:
        faiss = import_faiss()
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
