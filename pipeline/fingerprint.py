"""Fingerprints of files a stage reads from outside the store, and portable cache keys.

Parameters name a file; its content can change under the same name. A local file is fingerprinted
by its content (SHA-256), so that an edited file re-runs the stages that read it while a fresh
clone, a colleague's checkout or a copy with new modification times reuses the cache. Reading
gigabytes at every plan would cost too much, so each hash is kept in a small SQLite table under
``~/.cache/stele`` (``$XDG_CACHE_HOME``) keyed by the file's path, size, modification time and
inode: an unchanged file is read once. Inputs on other filesystems (``s3://`` and the like) are
fingerprinted by :mod:`pipeline.uris`, which uses these same lines for the local files among them.

Paths in a cache key are written relative to the roots the planner names (:func:`path_roots`: the
pipeline file's folder, ``$STELE_DATA``, the working directory, site-packages), ``{pipeline}/data/x.tsv`` rather
than ``/home/me/stele/pipelines/data/x.tsv``, so that two clones of the same commit share every
cache entry. (Only the key: a stage still reads the absolute path.)

A fingerprint is taken when a run is planned, before Ray starts, so it is also where an input that
does not exist is first seen: inside :func:`missing_inputs` every fingerprint notes the files it
found missing, and the planner stops a run that would read one with a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

_missing: ContextVar[list[str] | None] = ContextVar("stele_missing_inputs", default=None)
_roots: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("stele_path_roots", default=())


@contextlib.contextmanager
def path_roots(roots: Mapping[str, str | Path | None]) -> Iterator[None]:
    """Inside the block, :func:`portable` writes paths under these roots (``name -> folder``)
    relative to them. The longest matching root wins."""
    pairs = [(name, os.path.abspath(str(folder))) for name, folder in roots.items() if folder]
    token = _roots.set(tuple(sorted(pairs, key=lambda p: -len(p[1]))))
    try:
        yield
    finally:
        _roots.reset(token)


def portable(value: Any) -> Any:
    """``value`` (parameters: dicts, lists, strings) with every absolute path under one of the
    current :func:`path_roots` written as ``{root}/relative/path``: what goes into a cache key."""
    if isinstance(value, str):
        for name, folder in _roots.get():
            if value == folder or value.startswith(folder.rstrip(os.sep) + os.sep):
                return "{" + name + "}" + value[len(folder.rstrip(os.sep)):]
        return value
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


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
    """SHA-256 over ``(name, content hash)`` of each file, names relative to ``root`` if given
    (else :func:`portable`). A missing file counts as ``missing`` (and is noted, see
    :func:`missing_inputs`)."""
    h = hashlib.sha256()
    update_local(h, paths, root)
    return h.hexdigest()


def update_local(h: "hashlib._Hash", paths: Iterable[Path], root: Path | None = None) -> None:
    """Feed :func:`files_fingerprint`'s lines for ``paths`` (sorted) into ``h``."""
    with _HashCache.open() as cache:
        for p in sorted(Path(p) for p in paths):
            name = p.relative_to(root) if root is not None and p != root and p.is_relative_to(root) \
                else p.name if root is not None else portable(str(p))
            try:
                h.update(f"{name}\0{cache.digest(p)}\n".encode())
            except FileNotFoundError:
                h.update(f"{name}\0missing\n".encode())
                note_missing(p)


class _HashCache:
    """SHA-256 of local files, remembered by ``(path, size, mtime_ns, inode)`` in SQLite. Where the
    cache cannot be opened (a read-only home, say), files are simply hashed every time."""

    def __init__(self, db: sqlite3.Connection | None):
        self.db = db

    @classmethod
    @contextlib.contextmanager
    def open(cls) -> Iterator["_HashCache"]:
        db = None
        try:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stele"
            base.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(base / "file-hashes.sqlite", timeout=30)
            db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT, size INTEGER, mtime_ns INTEGER,"
                       " inode INTEGER, sha256 TEXT, PRIMARY KEY (path, size, mtime_ns, inode))")
        except (OSError, RuntimeError, sqlite3.Error):  # RuntimeError: no home directory
            db = None
        try:
            yield cls(db)
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.commit()
        finally:
            if db is not None:
                db.close()

    def digest(self, path: Path) -> str:
        st = path.stat()  # FileNotFoundError: the caller notes a missing input
        real = os.path.realpath(path)
        key = (real, st.st_size, st.st_mtime_ns, st.st_ino)
        if self.db is not None:
            try:
                row = self.db.execute("SELECT sha256 FROM hashes WHERE path=? AND size=? AND "
                                      "mtime_ns=? AND inode=?", key).fetchone()
                if row:
                    return row[0]
            except sqlite3.Error:
                self.db = None
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if self.db is not None:
            try:
                self.db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (*key, digest))
            except sqlite3.Error:
                self.db = None
        return digest


def tree_files(root: Path) -> list[Path]:
    """The files under ``root`` (or ``root`` itself when it is a file)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
