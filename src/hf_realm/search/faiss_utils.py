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


_INSTALL_HINT = (
    "this index backend needs faiss: `pip install faiss-cpu` (or `pip install hf_realm[faiss]`; "
    "`faiss-gpu-cu12` for GPU indexes), or use backend='torch' (exact search in torch, no faiss)"
)


def import_faiss():
    """The `faiss` module; an `ImportError` that names the package to install when it is missing."""
    # The import itself decides, not transformers' `is_faiss_available`: that answer is cached for the process, so one
    # call while faiss was hidden or not yet installed would refuse faiss for good (a missing faiss fails fast anyway).
    try:
        with quiet_faiss_loader():
            import faiss
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
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
