"""Atomic file writes: a file that exists is always complete, whoever was interrupted."""

import contextlib
import os
import shutil
import threading
from pathlib import Path


@contextlib.contextmanager
def atomic(path: Path):
    """Yield a temporary path beside `path` (same folder, so the final rename is atomic); it
    becomes `path` only if the block succeeds. The name is unique per process and thread, so
    concurrent writers of the same file never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():  # a checkpoint folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
