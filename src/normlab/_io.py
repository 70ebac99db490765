"""Files written whole or not at all: :func:`write_atomic`, the one writer behind every result file normlab
writes (lab results and reports, ``normlab inspect``'s page, ``normlab fold``'s model)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomic"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path | str, content: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``content`` (bytes, text in UTF-8, or a function that writes into the binary file it is given,
    e.g. ``lambda fh: torch.save(model, fh)``) so that ``path`` holds either its old content or the complete
    new one: a temporary file in the same folder, with the user's usual mode, flushed to disk, then renamed
    over ``path``. The folder is created if needed; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
