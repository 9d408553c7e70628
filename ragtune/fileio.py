"""Files that survive kills: write-then-rename, one-line errors for torn files, one trainer per folder.

What: `write_text` / `write_bytes` / `save_torch` write to a temporary name in the same folder,
fsync, then rename, so a reader (or a resumed run) only ever sees the old file or the new one.
`load_torch` / `load_json` turn a truncated or corrupt file into `CorruptFile` naming it.
`DirLock` holds an exclusive `flock` on a folder's lock file for the life of the process; the OS
releases it when the process dies (even by `kill -9`), so a stale lock never blocks a resume.
Why here: the run directory, checkpoints, configs and leaderboards all need the same guarantees.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, Path]


class CorruptFile(ValueError):
    """A file exists but cannot be read back (torn by a kill, truncated, not what it should be)."""


class Busy(RuntimeError):
    """Another process holds the folder's lock."""


def write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    """Strict JSON: a NaN or infinity is written as null, never as the invalid `NaN`/`Infinity`."""
    write_text(path, json.dumps(_finite(obj), indent=2, default=float, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_torch(obj: Any, path: PathLike) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: PathLike) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CorruptFile(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def load_json(path: PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFile(f"{path}: unreadable JSON ({str(e).splitlines()[0][:200]})") from e


class DirLock:
    """An exclusive lock on `folder/name`, held until `release()` or the process's death."""

    def __init__(self, folder: PathLike, name: str = "train.lock"):
        self.path = Path(folder) / name
        self._fd: Optional[int] = None

    def acquire(self, wait: bool = False) -> DirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(f"{self.path.parent}: another process (pid {holder}) is training this run directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """True if some other process holds the lock now (does not take it)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
