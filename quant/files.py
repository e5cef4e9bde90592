"""File I/O that every layer shares, each failure one UserError naming the file: exact positioned reads,
copies of input files, safetensors output with ordinary permissions, and finished output folders put in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def copy_input(src, dst) -> None:
    """`shutil.copy2` of an input file (a tokenizer file into the output folder): failing to read it is
    "cannot read" here; failing to write goes on to `writing`, which words it."""
    try:
        shutil.copy2(src, dst)
    except OSError as exc:
        # Opening SRC failed (filename SRC, no filename2); a failed sendfile names both, whichever side failed.
        if exc.filename2 is None and exc.filename is not None and os.path.abspath(exc.filename) == os.path.abspath(src):
            raise UserError(f"{src}: cannot read ({exc.strerror})") from None
        raise


def pread_exactly(fd: int, view: memoryview, offset: int, path, what: str) -> None:
    """Fill `view` with the bytes of `fd` from `offset`, or raise one UserError naming `path` and `what`
    (e.g. "expert (3, 1)"). Loops, since one read returns at most ~2 GiB on Linux; a read that ends early
    means the file shrank after it was opened and checked."""
    view = view.cast("B")
    got, want = 0, len(view)
    while got < want:
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            raise UserError(f"{path}: read failed for {what} ({exc.strerror})") from None
        if n == 0:
            raise UserError(f"{path}: truncated since it was opened ({what}: read {got} of {want} bytes)")
        got += n


def save_tensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` (with `metadata`, strings, beside torch's "format"), leaving the file readable
    as any file this process creates (the library writes it owner-only, 0600, which a model folder shared with
    others cannot be). Best effort: a filesystem that refuses chmod keeps the library's mode."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    try:
        os.chmod(path, 0o666 & ~current_umask())
    except OSError:
        pass


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def work_folder(dst) -> Path:
    """A new, empty folder beside `dst` to write it into before `swap_in`: hidden and named by this process
    (`.NAME.tmp-PID`), so no folder of the user's shares its name. One left by a killed process that had
    this pid is cleared first."""
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_in(tmp, dst) -> None:
    """Rename the finished folder `tmp` into place; an existing `dst` is moved aside first, then removed (so
    `dst` never holds half of each): a real folder with its contents, a symlink or a file by unlinking it
    (a link's target is not dst's)."""
    tmp, dst = Path(tmp), Path(dst)
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def current_umask() -> int:
    """The process's umask, read without setting it where Linux reports it (os.umask sets it to read it,
    process-wide, for an instant)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
