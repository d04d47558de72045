"""Build a folder exactly once, safely under concurrent processes.

Several processes (pytest workers, a vLLM engine and its API server, two `make models`) may ask
for the same cached artefact at the same time. The protocol:

1. Fast path: the folder exists and holds the completion marker -> return it. The marker is
   written last, inside the temp folder, before the rename, so its presence means "complete".
2. Otherwise take an exclusive `fcntl.flock` on a lock file beside the folder, and check again
   (another process may have finished while we waited).
3. Build into a fresh temp folder in the same parent (same filesystem, so the rename is atomic),
   write the marker, `os.rename` it into place. A crash leaves only a `.tmp-*` folder, never a
   half-built folder under the final name; a leftover folder without a marker is removed.

Imports only the standard library.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".vas-complete"


def is_complete(folder: Path) -> bool:
    """True when `folder` was finished by `build_once` (its marker exists)."""
    return (folder / COMPLETE_MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    """The JSON payload written into the marker (the build parameters)."""
    return json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # blocks until the other builder is done
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_params(folder: Path, params: dict[str, Any]) -> None:
    found = read_marker(folder)
    if found != params:
        raise ValueError(
            f"{folder} was already built with different parameters: expected {params}, "
            f"found {found}. Remove the folder or choose another one."
        )


def _chmod_like_mkdir(path: Path) -> None:
    # mkdtemp makes 0700 folders; a shared cache should get the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def build_once(
    folder: Path, build: Callable[[Path], None], *, params: dict[str, Any] | None = None
) -> Path:
    """Return `folder`, calling `build(tmp_dir)` first if no complete build exists.

    `build` must fill the empty directory it is given. `params` (JSON-serialisable) are stored in
    the marker; a later call with different params raises ValueError instead of silently
    returning an artefact built differently.
    """
    folder = Path(folder).expanduser().resolve()
    params = dict(params or {})
    if is_complete(folder):
        _check_params(folder, params)
        return folder
    lock_path = folder.parent / f".{folder.name}.lock"
    with _exclusive_lock(lock_path):
        if is_complete(folder):  # built by another process while we waited for the lock
            _check_params(folder, params)
            return folder
        if folder.exists():
            logger.warning("removing incomplete build at %s (no %s marker)", folder, COMPLETE_MARKER)
            shutil.rmtree(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _chmod_like_mkdir(tmp)
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True), encoding="utf-8")
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("built %s", folder)
    return folder
