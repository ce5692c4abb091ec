"""Small filesystem helpers shared by bundle writing, training checkpoints and evaluation runs.

None of them changes process-wide state: the umask is read, never set (:func:`current_umask`), and temporary
files are created the way ``open()`` creates files, so they get the permissions a plain write would give.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["atomic_concat", "atomic_json", "atomic_text", "current_umask", "replace_dir"]


def current_umask() -> int:
    """The process's umask, read without changing it: from ``/proc/self/status`` on Linux (4.7 and later); else
    from the mode a directory made with mode 0o777 gets in the temporary folder (a default ACL there would show
    in it too). Setting the umask to read it, the usual trick, would race with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    probe = Path(tempfile.gettempdir()) / f".r2r-umask-{secrets.token_hex(8)}"
    os.mkdir(probe, 0o777)
    try:
        return 0o777 & ~probe.stat().st_mode
    finally:
        os.rmdir(probe)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_warned_not_atomic = False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's ``renameat2(RENAME_EXCHANGE)``; False where the system or the
    file system does not offer it (nothing is changed then)."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst`` (removed only after the move).

    Atomic on Linux: an existing ``dst`` is swapped with ``src`` in one ``renameat2(RENAME_EXCHANGE)``, so a
    reader sees the old folder or the new one and never a missing path. Where that call is missing (other
    systems, old kernels, file systems without it) the old folder is first renamed away and the new one moved in:
    between the two renames ``dst`` does not exist (a warning says so once).
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # the old folder, now under src's name
        return dst
    global _warned_not_atomic
    if not _warned_not_atomic:
        logger.warning("replace_dir: this system cannot swap folders atomically; %s is missing for a moment", dst)
        _warned_not_atomic = True
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _tmp_path(path: Path) -> Path:
    """A new, empty temporary file beside ``path``, created like ``open(..., "w")`` creates files (mode 0o666 less
    the umask, and any default ACL of the folder), so the file it becomes has the permissions of a plain write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_json(data, path: str | Path) -> Path:
    return atomic_text(json.dumps(data, indent=2, sort_keys=True, default=str), path)


def atomic_concat(parts: list[Path], path: str | Path, sha256: str | None = None) -> Path:
    """Concatenate the files ``parts`` into ``path`` atomically: written to a temporary file beside it, checked
    against ``sha256`` when given (a ValueError on a mismatch), then renamed into place, so ``path`` is either
    absent (or as it was) or complete."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(
                f"concatenating {len(parts)} parts into {path.name} gave sha256 {digest.hexdigest()}, expected "
                f"{sha256}: a part is damaged or from another version"
            )
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
