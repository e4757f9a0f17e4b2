"""Atomic file writes: a file at its final name is always whole, the old one or the new one.

Every writer writes a temporary file beside the target (same folder, so the rename stays on one
filesystem and is atomic), fsyncs it, renames it over the target and fsyncs the folder, so that
the rename survives a power cut too. Each temporary name is unique (pid + random), so concurrent
writers of one target never share a temporary: the last rename wins and a reader sees one
writer's complete file. On an error the temporary is deleted and the target is left as it was.

A killed writer leaves its temporary behind: a dot file named `.<stem>.tmp-<pid>-<hex><suffix>`.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # in every temporary name, after the target's stem


def temporary_name(path: Path | str) -> Path:
    """A fresh temporary beside `path`. It keeps the suffix: np.save, savefig and friends pick
    their format (or add an extension) from it."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}{path.suffix}")


def fsync_dir(path: Path | str) -> None:
    """Make the names in a folder (new files, renames) survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a unique temporary path for a writer that wants a file name (pq.write_table, torch.save,
    savefig, h5py); when the block ends without an error, that file becomes `path`.

        with atomic_path(out / "table.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)  # the data on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # "x": never write into someone else's file
        f.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically, as is (no newline translation); returns `path`."""
    return atomic_write_bytes(path, text.encode(encoding))
