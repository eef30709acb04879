"""Persistence shared by every object hf_realm saves: one directory replace, one Hub upload, one Hub download."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished directory ``src`` to ``dst``; an existing ``dst`` is renamed aside first and removed only after
    the new one is in place."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, backup)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(backup, dst)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(src, dst)
