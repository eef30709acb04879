"""faiss is optional: imported lazily, with an install hint when missing."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_faiss_loader():
    """faiss's loader logs at INFO which CPU build it tries (a failed AVX512 attempt reads like an error): keep it to
    warnings while faiss is imported."""
    loader = logging.getLogger("faiss.loader")
    level = loader.level
    loader.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        loader.setLevel(level)


def import_faiss():
    try:
        with quiet_faiss_loader():
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
