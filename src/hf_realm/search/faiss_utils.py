"""faiss is optional: imported lazily, with an install hint when missing."""

from __future__ import annotations

import contextlib
import logging

from transformers.utils import is_faiss_available


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
    # transformers' cached check first (no import); the import itself can still fail (a broken install, or a test
    # that hides the module).
    if not is_faiss_available():
        raise ImportError(_INSTALL_HINT)
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
