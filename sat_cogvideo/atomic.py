"""Atomic file writes: write to a temporary name in the target folder, then rename it over the target.

An interrupted run never leaves a truncated file under the final name.  Folder-level writes (a whole checkpoint
or converted model) build a folder from :func:`make_temp_dir` and rename it when complete.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def _default_mode(base: int = 0o666) -> int:
    """``base & ~umask``: the mode ``open()`` (0o666) or ``mkdir`` (0o777) would give (``mkstemp``/``mkdtemp``
    give 0o600/0o700, unreadable to the other users of a shared cluster)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def make_temp_dir(parent, prefix: str) -> str:
    """A new temporary folder inside ``parent`` with the mode ``mkdir`` would give it, to be renamed when filled."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, _default_mode(0o777))
    return tmp


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The caller writes the file at the yielded path (by name, so any writer works).  ``suffix`` (default: the
    extension of ``path``) ends the temporary name, so writers that choose their format from the extension
    (ffmpeg) still work.  Before the rename the file gets the mode a plain ``open()`` would give it, so other
    users can read it where the umask allows.  On error the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".partial-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj, path)`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
