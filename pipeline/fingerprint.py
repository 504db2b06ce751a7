"""Fingerprints of files a stage reads from outside the store, for its cache key.

Parameters name a file; its content can change under the same name. Hashing sizes and modification
times (not contents: those can be gigabytes) makes an edited file re-run the stages that read it.
Inputs on other filesystems (``s3://`` and the like) are fingerprinted by :mod:`pipeline.uris`,
which uses these same lines for the local files among them.

A fingerprint is taken when a run is planned, before Ray starts, so it is also where an input that
does not exist is first seen: inside :func:`missing_inputs` every fingerprint notes the files it
found missing, and the planner stops a run that would read one with a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

_missing: ContextVar[list[str] | None] = ContextVar("stele_missing_inputs", default=None)


@contextlib.contextmanager
def missing_inputs() -> Iterator[list[str]]:
    """The inputs that the fingerprints taken inside the block found missing (filled as they go)."""
    token = _missing.set([])
    try:
        yield _missing.get()  # type: ignore[misc]
    finally:
        _missing.reset(token)


def note_missing(name: str | Path) -> None:
    """Record a missing input for the enclosing :func:`missing_inputs`, if any."""
    found = _missing.get()
    if found is not None and str(name) not in found:
        found.append(str(name))


def files_fingerprint(paths: Iterable[Path], root: Path | None = None) -> str:
    """SHA-256 over ``(name, size, mtime_ns)`` of each file, names relative to ``root`` if given.
    A missing file counts as ``missing`` (and is noted, see :func:`missing_inputs`)."""
    h = hashlib.sha256()
    update_local(h, paths, root)
    return h.hexdigest()


def update_local(h: "hashlib._Hash", paths: Iterable[Path], root: Path | None = None) -> None:
    """Feed :func:`files_fingerprint`'s lines for ``paths`` (sorted) into ``h``."""
    for p in sorted(Path(p) for p in paths):
        name = p.relative_to(root) if root is not None and p != root and p.is_relative_to(root) \
            else p.name if root is not None else p
        try:
            st = p.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{name}\0missing\n".encode())
            note_missing(p)


def tree_files(root: Path) -> list[Path]:
    """The files under ``root`` (or ``root`` itself when it is a file)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
