"""Inputs on any fsspec URI: local paths, ``s3://``, ``gs://``, ``memory://``, ...

Every reader of a file outside the store (knowledge sources, the text corpus of ``knowledge.link``,
media datasets, :func:`pipeline.readers.read_lines`) goes through this module, so they all accept
the same locations and say the same thing when one cannot be opened:

- :func:`input_path` turns a parameter into something to read: a :class:`pathlib.Path` for a local
  path (so local reading is exactly what it always was) or a :class:`URIPath`, the part of Path's
  API the readers use (``/``, ``name``, ``suffix``, ``parent``, ``is_file()``, ``open()``, ...) on
  the URI's fsspec filesystem. :func:`open_input` opens either, gzip/bz2 by request.
- :func:`check_input` (pydantic: :data:`InputURI`) and :func:`resolve_input` (:data:`ResolvedInput`)
  validate a parameter before Ray starts: a URI whose protocol is unknown, or whose package is
  missing, is one line naming the extra to install (``s3://bucket/x: s3fs is not installed (pip
  install 'stele[s3]')``). :func:`resolve_input` also makes local paths absolute (a Ray worker has
  another working directory); URIs are kept as written, so no parameter records a path that only
  the driver can read.
- :func:`inputs_fingerprint` / :func:`input_fingerprint` put the inputs' state into the cache key:
  local files by content, as :func:`pipeline.fingerprint.files_fingerprint` does, remote files by size plus what the filesystem's ``info()`` says about their
  content (an ETag or checksum where there is one, else a modification time), so a changed remote
  file re-runs the stages that read it.

Credentials and endpoints are fsspec's business, as for the store: s3fs reads the usual AWS
variables and files; ``FSSPEC_S3_ENDPOINT_URL`` (any ``FSSPEC_<PROTOCOL>_<OPTION>``) sets an option.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import posixpath
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any

from pydantic import AfterValidator

from .errors import StageFailed
from .fingerprint import files_fingerprint, note_missing, tree_files, update_local

# The stele extra that installs a protocol's filesystem package (pyproject.toml).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
LOCAL_PROTOCOLS = ("file", "local")
# "proto://..." or a chained "proto::other://..." (a local name with "::" in it stays a path).
_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)(?:://|::(?=.*://))")
_INSTALL = re.compile(r"\b[Ii]nstall (?:the )?([A-Za-z0-9_.\-]+)")
_COMPRESSORS = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}
_SUFFIX_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
# info() keys that change with the content (preferred), then ones that change with each write.
_CONTENT_KEYS = ("ETag", "etag", "md5Hash", "md5", "crc32c", "checksum", "sha256")
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


class InputError(StageFailed, ValueError):
    """An input location no filesystem here can open: an unknown protocol, or one whose package is
    not installed. Also a ``ValueError``, so that raised by a parameter's validator it becomes the
    pipeline's one-line error (``file:line: field: message``, exit 2)."""


def protocol_of(uri: Any) -> str | None:
    """``s3`` for ``s3://bucket/x`` (``simplecache`` for ``simplecache::s3://...``); None for a
    plain path."""
    m = _PROTOCOL.match(str(uri))
    return m[1].lower() if m else None


def is_uri(uri: Any) -> bool:
    """Whether ``uri`` names a location on a filesystem other than the local one (``file://`` is
    local)."""
    if isinstance(uri, URIPath):
        return True
    p = protocol_of(uri) if isinstance(uri, str) else None
    return p is not None and p not in LOCAL_PROTOCOLS


def _local(uri: str) -> str:
    """``file:///x`` -> ``/x``; a plain path as it is."""
    p = protocol_of(uri)
    return uri.split("://", 1)[1] if p in LOCAL_PROTOCOLS and "://" in uri else uri


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def missing_package(uri: str, error: ImportError) -> str:
    """The one-line message for a protocol whose package cannot be imported: fsspec's error names
    the package (``Install s3fs to access S3``); the message names stele's extra where there is
    one: ``s3://bucket/x: s3fs is not installed (pip install 'stele[s3]')``."""
    why = _first_line(error)
    m = _INSTALL.search(why)
    package = m[1] if m else None
    cause = error.__cause__
    missing = cause.name if isinstance(cause, ModuleNotFoundError) and cause.name else None
    package = package or (missing.split(".")[0] if missing else None)
    if package is None:
        return f"{uri}: {why}"
    extra = EXTRAS.get(protocol_of(uri) or "")
    how = f"pip install 'stele[{extra}]'" if extra else f"pip install {package}"
    norm = lambda name: name.lower().replace("-", "_")  # noqa: E731
    if cause is not None and (missing is None or norm(missing) != norm(package)):
        # The package is there but something it imports is not (or is broken): say what.
        return f"{uri}: {package} cannot be imported ({_first_line(cause)}; {how})"
    return f"{uri}: {package} is not installed ({how})"


def filesystem_class(uri: str) -> type:
    """The fsspec filesystem class of ``uri``'s protocol (imported, nothing connected), or an
    :class:`InputError` in one line."""
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol_of(uri))
    except ImportError as e:
        raise InputError(missing_package(uri, e)) from None
    except ValueError as e:  # "Protocol not known: foo"
        raise InputError(f"{uri}: {_first_line(e)}") from None


def filesystem(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path on it)`` of a URI, or an :class:`InputError` in one line."""
    import fsspec

    filesystem_class(uri)
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as e:  # a chained URL's inner protocol
        raise InputError(missing_package(uri, e)) from None
    except (ValueError, OSError) as e:
        raise InputError(f"{uri}: {_first_line(e)}") from None


def check_input(value: str) -> str:
    """A parameter naming an input, checked before anything runs: a URI's filesystem must be
    importable (else :class:`InputError`); ``file://`` becomes a plain path; the rest is kept as
    written (sources keep relative paths relative, as they always have)."""
    if is_uri(value):
        filesystem_class(value)
        return value
    return _local(value)


def resolve_input(value: str) -> str:
    """:func:`check_input`, and a local path made absolute, so that a Ray worker (another working
    directory) reads the file the planner fingerprinted. URIs are kept as written."""
    if is_uri(value):
        return check_input(value)
    return str(Path(_local(value)).expanduser().resolve())


# Parameter types: `path: InputURI`, `text: ResolvedInput`.
InputURI = Annotated[str, AfterValidator(check_input)]
ResolvedInput = Annotated[str, AfterValidator(resolve_input)]


class URIPath:
    """A file or folder on a URI's fsspec filesystem, with the part of :class:`pathlib.Path` the
    readers use. ``str()`` is the URI as written (messages name what the user wrote); joining keeps
    its spelling. It has no ``__fspath__`` on purpose: handing it to ``open()`` fails loudly rather
    than reading a local file named ``s3:/...``."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self._fs: Any = None
        self._path = ""

    # -- the filesystem, connected on first use ------------------------------------------------
    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._path = filesystem(self.uri)
        return self._fs

    @property
    def fs_path(self) -> str:
        """The path as the filesystem spells it (``bucket/key`` for s3)."""
        self.fs  # noqa: B018 - sets _path
        return self._path

    # -- names ---------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"URIPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URIPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: URIPath) -> bool:
        return self.uri < other.uri

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}  # a worker opens its own filesystem

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"])

    def _split(self) -> tuple[str, str]:
        """``("s3://", "bucket/a/b.tsv")``."""
        sep = "://" if "://" in self.uri else "::"
        head, _, rest = self.uri.partition(sep)
        return head + sep, rest

    @property
    def name(self) -> str:
        return PurePosixPath(self._split()[1].rstrip("/")).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> URIPath:
        head, rest = self._split()
        rest = rest.rstrip("/")
        return URIPath(head + rest.rsplit("/", 1)[0]) if "/" in rest else self

    def __truediv__(self, other: str | PurePosixPath) -> URIPath:
        return URIPath(self.uri.rstrip("/") + "/" + str(other).lstrip("/"))

    def relative_to(self, other: URIPath) -> str:
        base = other.uri.rstrip("/") + "/"
        if not self.uri.startswith(base):
            raise ValueError(f"{self} is not under {other}")
        return self.uri[len(base):]

    def is_absolute(self) -> bool:
        return True

    def resolve(self) -> URIPath:
        return self

    def expanduser(self) -> URIPath:
        return self

    def as_uri(self) -> str:
        return self.uri

    # -- the filesystem ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.fs_path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.fs_path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.fs_path)

    def open(self, mode: str = "rb", compression: str | None = None, **kwargs: Any) -> IO:
        """An open file (``compression``: ``gzip``, ``bz2``, ``infer`` from the suffix, ...;
        ``encoding`` and ``newline`` for text modes)."""
        return self.fs.open(self.fs_path, mode, compression=compression, **kwargs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.fs_path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def iterdir(self) -> Iterator[URIPath]:
        for p in sorted(self.fs.ls(self.fs_path, detail=False)):
            yield self / posixpath.basename(p.rstrip("/"))

    def files(self) -> list[URIPath]:
        """Every file under this folder (one listing, however deep), sorted; ``[self]`` for a
        file."""
        base = self.fs_path.rstrip("/")
        found = self.fs.find(base)
        if found == [base]:
            return [self]
        return sorted(self / p[len(base) + 1:] for p in found if p.startswith(base + "/"))


def input_path(value: str | Path | URIPath) -> Path | URIPath:
    """What a reader reads: a local :class:`~pathlib.Path` (``file://`` stripped), or a
    :class:`URIPath`."""
    if isinstance(value, (Path, URIPath)):
        return value
    value = str(value)
    return URIPath(value) if is_uri(value) else Path(_local(value))


def open_input(value: str | Path | URIPath, mode: str = "rb", compression: str | None = None,
               **kwargs: Any) -> IO:
    """Open a local or remote input. ``compression``: None, ``gzip``, ``bz2``, ``xz`` or ``infer``
    (by the suffix: ``.gz``, ``.bz2``, ``.xz``); ``encoding``/``errors``/``newline`` for text."""
    p = input_path(value)
    if compression == "infer":
        compression = _SUFFIX_COMPRESSION.get(p.suffix.lower())
    if isinstance(p, URIPath):
        return p.open(mode, compression=compression, **kwargs)
    if compression is None:
        return open(p, mode, **kwargs)
    if compression not in _COMPRESSORS:
        raise ValueError(f"{p}: unknown compression {compression!r}")
    return _COMPRESSORS[compression](p, mode, **kwargs)


def input_files(value: str | Path | URIPath) -> list[Path | URIPath]:
    """The files under a folder, or the file itself (locally
    :func:`~pipeline.fingerprint.tree_files`)."""
    p = input_path(value)
    if isinstance(p, Path):
        return tree_files(p)
    return p.files() if p.is_dir() else [p]


def file_checker(root: Path | URIPath):
    """``exists(rel) -> bool`` for files under ``root``: a stat per call locally (as the readers
    always did), one listing of the folder for a URI (a request per item would cost a round trip
    each on an object store)."""
    if isinstance(root, Path):
        return lambda rel: (root / rel).is_file()
    names: set[str] | None = None

    def exists(rel: str) -> bool:
        nonlocal names
        if names is None:
            names = {f.relative_to(root) for f in root.files()} if root.is_dir() else set()
        return posixpath.normpath(str(rel)) in names

    return exists


# -- fingerprints --------------------------------------------------------------------------------
def _version(fs: Any, path: str, info: dict[str, Any]) -> str:
    for k in _CONTENT_KEYS:
        if info.get(k):
            return f"{k}={info[k]}"
    for k in _TIME_KEYS:
        if info.get(k) is not None:
            return f"{k}={info[k]}"
    try:
        return f"modified={fs.modified(path).isoformat()}"
    except (NotImplementedError, AttributeError, OSError):
        return f"checksum={fs.checksum(path)}"


def _remote_line(p: URIPath, name: str) -> str:
    fs, path = p.fs, p.fs_path
    try:
        fs.invalidate_cache(path)  # a listing cached earlier in this process must not hide a change
        info = fs.info(path)
    except FileNotFoundError:
        note_missing(p.uri)
        return f"{name}\0missing\n"
    return f"{name}\0{info.get('size')}\0{_version(fs, path, info)}\n"


def inputs_fingerprint(paths: Iterable[str | Path | URIPath],
                       root: str | Path | URIPath | None = None) -> str:
    """SHA-256 over each input's name (relative to ``root`` if given), size and version. When all
    are local this is :func:`~pipeline.fingerprint.files_fingerprint` itself (cache keys of local
    inputs are what they always were); remote files add their size and content tag from
    ``info()``. A missing file counts as ``missing`` (and is noted: :func:`~pipeline.fingerprint.missing_inputs`)."""
    items = [input_path(p) for p in paths]
    base = input_path(root) if root is not None else None
    local = [p for p in items if isinstance(p, Path)]
    remote = sorted(p for p in items if isinstance(p, URIPath))
    local_root = base if isinstance(base, Path) else None
    if not remote:
        return files_fingerprint(local, root=local_root)
    h = hashlib.sha256()
    update_local(h, local, local_root)
    for p in remote:
        if isinstance(base, URIPath) and p != base and p.uri.startswith(base.uri.rstrip("/") + "/"):
            name = p.relative_to(base)
        else:
            name = p.name if base is not None else p.uri
        h.update(_remote_line(p, name).encode())
    return h.hexdigest()


def input_fingerprint(value: str | Path | URIPath) -> str:
    """The fingerprint of one input file or folder (every file under it, names relative to it);
    for a local path the same as ``files_fingerprint(tree_files(root), root=root)``."""
    root = input_path(value)
    if isinstance(root, Path):
        return files_fingerprint(tree_files(root) if root.exists() else [root], root=root)
    return inputs_fingerprint(input_files(root) if root.exists() else [root], root=root)
