"""Content-addressed artifact store.

Layout under the store root (a local folder, or any fsspec URI such as ``s3://bucket/stele``)::

    artifacts/<key>/            one finished artifact: the stage's files, log.txt, manifest.json
    artifacts/<key>/manifest.json   written LAST: an artifact is complete iff its manifest exists
    tmp/<key>.<host>.<pid>.<rand>/  work in progress (local stores), renamed into place on success
    locks/<key>                 held (flock) by the process making that artifact (local stores)
    state/<key>/                resumable state that outlives a killed run (e.g. Ray Train checkpoints)
    failed/<key>/               the work folder of the last failed attempt, with its log.txt
    runs/<run-id>.json          what each ``stele run`` did, stage by stage

The key is ``sha256`` of the stage type, its code version, the canonical parameters (defaults
included, so changing a default invalidates the cache) and the keys of the inputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError

MANIFEST = "manifest.json"
LOG = "log.txt"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def artifact_key(stage_type: str, version: str, params: dict[str, Any],
                 input_keys: dict[str, str], fingerprint: Any = None) -> str:
    payload = {"type": stage_type, "version": version, "params": params, "inputs": input_keys}
    if fingerprint is not None:
        payload["fingerprint"] = fingerprint
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def default_store_uri(spec_store: str | None = None) -> str:
    return os.environ.get("STELE_STORE") or spec_store or str(Path("stele-store").resolve())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Artifact:
    """A finished artifact as a stage sees its inputs: a local folder plus its manifest, and its
    location in the store (``uri``: the same folder for a local store, ``s3://...`` and the like
    otherwise), which Ray tasks and training workers on any node read from."""

    key: str
    path: Path
    manifest: dict[str, Any]
    uri: str = ""  # empty: the local folder itself

    def __post_init__(self) -> None:
        if not self.uri:
            object.__setattr__(self, "uri", str(self.path))

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def __truediv__(self, name: str) -> Path:
        return self.path / name


class ArtifactStore:
    def __init__(self, uri: str | os.PathLike):
        self.uri = str(uri)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.uri)
        except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
            from .uris import missing_package

            raise StoreError(f"store {missing_package(self.uri, e)}") from None
        except (ValueError, OSError) as e:  # "Protocol not known: foo"; hdfs without a JVM
            raise StoreError(f"store {self.uri}: {_first_line(e)}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(root).resolve()) if self.local else root.rstrip("/")
        if self.local:
            self.uri = self.root

    def check_writable(self) -> None:
        """Raise :class:`StoreError` (one line naming the store) unless a run could write here: a
        local store must be a folder, or creatable, and writable. Checked by trying (creating the
        missing folders and a file), so that it holds for root and on special filesystems too;
        what the check created is removed again. Remote stores are not probed (that would cost a
        round trip and, on object stores, proves little)."""
        if not self.local:
            return
        root = Path(self.root)
        made: list[Path] = []  # folders this check created, removed again at the end
        try:
            if root.exists() and not root.is_dir():
                raise StoreError(f"store {self.uri}: exists and is not a directory")
            missing = []
            p = root
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                try:
                    d.mkdir()
                    made.append(d)
                except FileExistsError:  # another process made it meanwhile
                    if not d.is_dir():
                        raise
                except OSError as e:
                    raise StoreError(f"store {self.uri}: cannot create it ({e.filename}: "
                                     f"{e.strerror or e})") from None
            fd, probe = tempfile.mkstemp(prefix=".stele-write-check.", dir=root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StoreError(f"store {self.uri}: cannot write in it ({e.strerror or e})") from None
        finally:
            for d in reversed(made):
                try:
                    d.rmdir()
                except OSError:  # someone else started using it meanwhile: leave it
                    break

    # -- paths ---------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def artifact_path(self, key: str) -> str:
        return self._join("artifacts", key)

    def state_uri(self, key: str) -> str:
        """Where a stage keeps resumable state (checkpoints) that must survive a killed run."""
        path = self._join("state", key)
        return path if self.local else f"{self.fs.unstrip_protocol(path)}"

    # -- reading -------------------------------------------------------------------------------
    def is_complete(self, key: str) -> bool:
        return self.fs.exists(f"{self.artifact_path(key)}/{MANIFEST}")

    def manifest(self, key: str) -> dict[str, Any]:
        try:
            with self.fs.open(f"{self.artifact_path(key)}/{MANIFEST}", "r") as f:
                return json.load(f)
        except FileNotFoundError:
            raise StoreError(f"no complete artifact {key} in {self.uri}") from None

    def keys(self) -> list[str]:
        base = self._join("artifacts")
        if not self.fs.exists(base):
            return []
        return sorted(Path(p).name for p in self.fs.ls(base, detail=False))

    def resolve(self, ref: str) -> str:
        """A full key from a key prefix (at least 6 characters), or from an artifact's folder path."""
        p = Path(ref)
        if self.local and (p / MANIFEST).exists():
            return p.resolve().name
        if len(ref) < 6:
            raise StoreError(f"artifact reference {ref!r} is too short: give at least 6 characters")
        hits = [k for k in self.keys() if k.startswith(ref)]
        if not hits:
            raise StoreError(f"no artifact {ref!r} in {self.uri}")
        if len(hits) > 1:
            raise StoreError(f"{ref!r} is ambiguous in {self.uri}: {', '.join(h[:12] for h in hits)}")
        return hits[0]

    def open(self, key: str, cache_dir: str | None = None) -> Artifact:
        """The artifact as a local folder; remote artifacts are downloaded once into a local cache."""
        manifest = self.manifest(key)
        if self.local:
            path = self.artifact_path(key)
            return Artifact(key, Path(path), manifest, path)
        cache = Path(cache_dir or os.environ.get("STELE_CACHE")
                     or Path.home() / ".cache" / "stele" / "artifacts")
        dest = cache / key
        if not (dest / MANIFEST).exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
            self.fs.get(self.artifact_path(key) + "/", str(tmp), recursive=True)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        return Artifact(key, dest, manifest, self.fs.unstrip_protocol(self.artifact_path(key)))

    def verify(self, key: str) -> list[str]:
        """Problems with a complete artifact: files the manifest lists that are missing or of the
        wrong size. Empty when the artifact is whole."""
        manifest = self.manifest(key)
        base = self.artifact_path(key)
        problems = []
        for rel, size in manifest.get("files", {}).items():
            path = f"{base}/{rel}"
            if not self.fs.exists(path):
                problems.append(f"{rel}: missing")
            elif self.fs.size(path) != size:
                problems.append(f"{rel}: {self.fs.size(path)} bytes, manifest says {size}")
        return problems

    # -- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the right to make artifact ``key``: an exclusive ``flock`` on ``locks/<key>``,
        which the kernel releases when its holder dies, ``kill -9`` included. Blocks while another
        process holds it, after calling ``on_wait`` once. Object stores have no such lock: two runs
        may then both make an artifact, and the second commit replaces the first with the same
        content (same key, same inputs)."""
        if not self.local:
            yield
            return
        path = Path(self._join("locks", key))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def new_work_dir(self, key: str) -> Path:
        """A fresh local folder for a stage to write its artifact into."""
        if self.local:
            base = Path(self._join("tmp"))
            base.mkdir(parents=True, exist_ok=True)
            d = base / f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            d.mkdir()
            return d
        return Path(tempfile.mkdtemp(prefix=f"stele-{key[:12]}-"))

    def commit(self, key: str, work: Path, manifest: dict[str, Any], replace: bool = False) -> bool:
        """Move a finished work folder into place, manifest last. Returns False when another run
        completed the same key first (the work is then discarded: same key, same content), unless
        ``replace`` (a forced re-run), which swaps the old artifact out first."""
        manifest = dict(manifest, key=key, files=_file_sizes(work))
        final = self.artifact_path(key)
        if self.is_complete(key) and not replace:
            shutil.rmtree(work, ignore_errors=True)
            return False
        if self.fs.exists(final):  # replaced, or an earlier attempt died before its manifest
            if self.local:  # drop the manifest first so the old folder is never "complete" in part
                Path(final, MANIFEST).unlink(missing_ok=True)
            self.fs.rm(final, recursive=True)
        if self.local:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            os.replace(work, final)  # atomic on one filesystem
        else:
            self.fs.put(str(work) + "/", final, recursive=True)
            shutil.rmtree(work, ignore_errors=True)
        self._write_json(f"{final}/{MANIFEST}", manifest)
        if self.fs.exists(self._join("state", key)):
            self.fs.rm(self._join("state", key), recursive=True)
        return True

    def keep_failed(self, key: str, work: Path) -> str:
        """Keep the last failed attempt (with its log) for inspection; returns its location."""
        dest = self._join("failed", key)
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        if self.local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            os.replace(work, dest)
        else:
            self.fs.put(str(work) + "/", dest, recursive=True)
            shutil.rmtree(work, ignore_errors=True)
        return dest

    def discard_attempt(self, key: str, work: Path) -> str:
        """Remove a failed attempt's files (its work folder, and an artifact folder that a commit
        left without its manifest) to give the space back, keeping only its log under
        ``failed/<key>``, where that still fits. Returns the log's location, or "" if none."""
        log = ""
        dest = self._join("failed", key)
        try:
            if self.fs.exists(dest):
                self.fs.rm(dest, recursive=True)
            if self.local and (work / LOG).exists():
                Path(dest).mkdir(parents=True)
                os.replace(work / LOG, Path(dest, LOG))  # a rename: needs no data blocks
                log = f"{dest}/{LOG}"
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)
        final = self.artifact_path(key)
        if not self.is_complete(key) and self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        return log

    def record_run(self, run: dict[str, Any]) -> str:
        path = self._join("runs", f"{run['run_id']}.json")
        self._write_json(path, run)
        return path

    def clean_tmp(self) -> int:
        """Remove work folders of dead processes on this host (left by kill -9). Returns the count."""
        if not self.local:
            return 0
        base = Path(self._join("tmp"))
        if not base.exists():
            return 0
        host, removed = socket.gethostname(), 0
        for d in base.iterdir():
            parts = d.name.split(".")
            if len(parts) >= 4 and parts[-3] == host and parts[-2].isdigit() \
                    and not _pid_alive(int(parts[-2])):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def _write_json(self, path: str, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        if self.local:  # write-then-rename: a reader never sees half a manifest
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)  # e.g. a full disk: leave no stray half file
                raise
        else:  # object stores make a PUT visible all at once
            with self.fs.open(path, "w") as f:
                f.write(text)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _file_sizes(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_size
            for p in sorted(work.rglob("*")) if p.is_file() and p.name != MANIFEST}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
