"""flashdispatch's folder for results that are slow to produce again (tuned launch configurations,
compiled CUDA kernels), shared by every process of the user, and how files are written there so
that those processes never read half a file.

Environment:
    FLASHDISPATCH_CACHE_DIR   the folder (default ~/.cache/flashdispatch)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHDISPATCH_CACHE_DIR") or Path.home() / ".cache" / "flashdispatch")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write a temporary file in `path`'s folder and rename it over `path`, so that a reader in
    another process sees the old file or the new one, never half of one. Raises OSError."""
    temporary = tempfile.NamedTemporaryFile("wb" if isinstance(data, bytes) else "w", dir=path.parent, delete=False,
                                            prefix=f"{path.name}.", suffix=".tmp")
    try:
        with temporary:
            temporary.write(data)
        os.replace(temporary.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary.name)
        raise
