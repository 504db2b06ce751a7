"""Models from elsewhere for ``fusion.retrieval``: precomputed vectors and precomputed score matrices,
scored by the same protocol (:mod:`fusion.retrieval.metrics`) as stele's own models (Hugging Face
models from local folders: :mod:`fusion.retrieval.hf`).

File formats (no pickle anywhere: ``numpy.load(allow_pickle=False)``, safetensors, Parquet):

**Vectors** of one side (``text_vectors``: the captions, ``media_vectors``: the items), one row per id,
scored by the dot product (normalise them first for cosine similarity, as CLIP does):

- ``NAME.npy``: a float array (N, D), and ``NAME.ids.txt`` beside it: N ids, one per line (UTF-8);
- ``NAME.safetensors``: a float tensor ``vectors`` (N, D) and the ids as a JSON list of N strings under
  the header metadata key ``ids``
  (``safetensors.numpy.save_file({"vectors": v}, path, metadata={"ids": json.dumps(ids)})``);
- ``NAME.parquet``: columns ``id`` (string) and ``vector`` (a list of D floats per row).

**A score matrix** (``scores``), texts x media, higher = better; both directions rank by it:

- ``NAME.npy``: a float array (T, M), with ``NAME.text_ids.txt`` (T lines) and ``NAME.media_ids.txt``
  (M lines) beside it;
- ``NAME.safetensors``: a float tensor ``scores`` (T, M), metadata ``text_ids`` and ``media_ids``
  (JSON lists);
- ``NAME.parquet``: columns ``text_id``, ``media_id``, ``score``: every (text, media) pair exactly once.

**Which texts belong to which media** (the relevance): by default the ``media`` feature artifact's
captions, text id ``<item id>#<k>`` for the k-th text of item ``<item id>`` (as
:func:`fusion.pairs.load_pairs` names them); or ``pairs``, a ``.parquet`` or ``.tsv`` (with a header
row) with columns ``text_id`` and ``media_id``, one row per correct pair.

Precomputed vectors and scores are evaluated on exactly the ids their files hold (the split was chosen
when they were computed); a text id that no pair names is a query without a correct item, skipped and
counted like any other.

Checked when loaded, each a one-line error naming the file and the field: the shape against the ids,
duplicate ids, NaN or infinite values, a non-float dtype, text and media vectors of different widths,
a score table with a missing or repeated pair.

"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import StageFailed
from pipeline.uris import URIPath, input_path, open_input

VECTOR_SUFFIXES = (".npy", ".safetensors", ".parquet")
PAIR_SUFFIXES = (".parquet", ".tsv")


class FormatError(StageFailed, ValueError):
    """A file of an external model that does not hold what its format says: ``<file>: <field>: why``
    in one line."""


def _fail(path: Any, field: str, why: str) -> FormatError:
    return FormatError(f"{path}: {field}: {why}")


# ----------------------------------------------------------------------------------- reading
def _suffix(path: Any, allowed: Sequence[str], what: str) -> str:
    suffix = input_path(path).suffix.lower()
    if suffix not in allowed:
        raise FormatError(f"{path}: {what} must be one of {', '.join(allowed)} "
                          f"(got {suffix or 'no suffix'!r})")
    return suffix


def _sibling(path: Any, tail: str) -> Path | URIPath:
    """``NAME.npy`` -> ``NAME<tail>`` in the same folder."""
    p = input_path(path)
    return p.parent / (p.name[: -len(p.suffix)] + tail)


def _read_bytes(path: Any) -> bytes:
    try:
        with open_input(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e})") from None


def _ids_file(path: Any) -> list[str]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, "ids", f"not UTF-8 text (byte {e.start})") from None
    return text.splitlines()


def _npy(path: Any, field: str, mmap: bool = False) -> np.ndarray:
    p = input_path(path)
    try:
        if isinstance(p, Path):
            if not p.is_file():
                raise FormatError(f"{path}: no such file")
            return np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None)
        return np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False)
    except FormatError:
        raise
    except ValueError as e:  # object arrays need pickle, which user files never get
        raise _fail(path, field, f"cannot be read without pickle ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise _fail(path, field, f"not a .npy file ({e})") from None


def _safetensors(path: Any, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``names`` (as torch: bfloat16 has no numpy dtype) and the header metadata."""
    from safetensors.torch import load

    raw = _read_bytes(path)
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        tensors = load(raw)
    except Exception as e:  # noqa: BLE001 - any parse error of the user's file: say which file
        raise FormatError(f"{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
    for name in names:
        if name not in tensors:
            raise _fail(path, name, f"no such tensor (the file has: {', '.join(sorted(tensors)) or 'none'})")
    return {k: tensors[k] for k in names}, header.get("__metadata__") or {}


def _meta_ids(path: Any, meta: dict[str, str], field: str) -> list[str]:
    if field not in meta:
        raise _fail(path, field, "missing from the header metadata (a JSON list of ids)")
    try:
        ids = json.loads(meta[field])
    except json.JSONDecodeError as e:
        raise _fail(path, field, f"not JSON ({e.msg})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fail(path, field, "must be a JSON list of strings")
    return ids


def _parquet(path: Any, columns: Sequence[str]) -> Any:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(_read_bytes(path)))
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    for c in columns:
        if c not in table.column_names:
            raise _fail(path, c, f"no such column (the table has: {', '.join(table.column_names)})")
    return table


def _string_ids(path: Any, column: Any, field: str) -> list[str]:
    ids = column.to_pylist()
    bad = next((i for i, x in enumerate(ids) if not isinstance(x, str)), None)
    if bad is not None:
        raise _fail(path, field, f"row {bad} is {ids[bad]!r}, not a string")
    return ids


def _check_ids(path: Any, field: str, ids: Sequence[str], rows: int, what: str) -> None:
    if len(ids) != rows:
        raise _fail(path, field, f"{len(ids)} ids for {rows} {what}")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise _fail(path, field, f"duplicate id {i!r}")
        seen.add(i)


def _as_float(path: Any, field: str, a: Any, ndim: int = 2) -> torch.Tensor:
    """A float32 tensor (rows read in chunks from a memory map), checked finite."""
    t = a if isinstance(a, torch.Tensor) else None
    dtype_ok = t.is_floating_point() if t is not None else np.issubdtype(a.dtype, np.floating)
    if not dtype_ok:
        raise _fail(path, field, f"must be floating point (got {a.dtype})")
    if len(a.shape) != ndim:
        raise _fail(path, field, f"must be {ndim}-D, got shape {tuple(a.shape)}")
    out = torch.empty(tuple(a.shape), dtype=torch.float32)
    step = max(1, (1 << 22) // max(1, int(np.prod(a.shape[1:]))))
    for s in range(0, a.shape[0], step):
        block = a[s:s + step]
        # (a copy: a memory map's rows are read-only)
        block = block.float() if t is not None else torch.from_numpy(np.array(block, dtype=np.float32))
        finite = torch.isfinite(block)
        if not bool(finite.all()):
            row = s + int((~finite).reshape(len(block), -1).any(1).nonzero()[0, 0])
            raise _fail(path, field, f"row {row} holds NaN or infinite values")
        out[s:s + step] = block
    return out


# ----------------------------------------------------------------------------------- vectors
@dataclass
class Vectors:
    """One side of a dual encoder's output: ``ids`` and their ``vectors`` (N, D) float32."""

    ids: list[str]
    vectors: torch.Tensor
    path: str


def model_files(path: str, kind: str = "vectors") -> list[Path | URIPath]:
    """The files a vectors file (``kind`` ``vectors``) or a score matrix (``scores``) is read from:
    a ``.npy`` and its ids files (for the cache key)."""
    if input_path(path).suffix.lower() != ".npy":
        return [input_path(path)]
    siblings = [".ids.txt"] if kind == "vectors" else [".text_ids.txt", ".media_ids.txt"]
    return [input_path(path), *(_sibling(path, s) for s in siblings)]


def load_vectors(path: str, field: str = "vectors") -> Vectors:
    """Vectors with their ids from ``.npy`` (+ ``.ids.txt``), ``.safetensors`` or ``.parquet`` (see
    the module docstring); ``field`` names the parameter in errors."""
    suffix = _suffix(path, VECTOR_SUFFIXES, field)
    if suffix == ".npy":
        ids_path = _sibling(path, ".ids.txt")
        if not ids_path.exists():
            raise _fail(path, "ids", f"no ids file {ids_path.name} beside it (one id per line)")
        arr, ids = _npy(path, "vectors", mmap=True), _ids_file(ids_path)
        _check_ids(ids_path, "ids", ids, len(arr), f"rows of {input_path(path).name}")
        return Vectors(ids, _as_float(path, "vectors", arr), str(path))
    if suffix == ".safetensors":
        tensors, meta = _safetensors(path, ["vectors"])
        ids = _meta_ids(path, meta, "ids")
        vec = tensors["vectors"]
        if vec.ndim != 2:
            raise _fail(path, "vectors", f"must be 2-D, got shape {tuple(vec.shape)}")
        _check_ids(path, "ids", ids, len(vec), "rows of vectors")
        return Vectors(ids, _as_float(path, "vectors", vec), str(path))
    import pyarrow as pa

    table = _parquet(path, ["id", "vector"])
    ids = _string_ids(path, table["id"], "id")
    _check_ids(path, "id", ids, table.num_rows, "rows")
    col = table["vector"].combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        raise _fail(path, "vector", f"must be a list of floats per row (got {col.type})")
    if col.null_count:
        raise _fail(path, "vector", f"row {col.is_null().to_pylist().index(True)} is null")
    lengths = np.asarray(col.value_lengths()) if not pa.types.is_fixed_size_list(col.type) \
        else np.full(len(col), col.type.list_size)
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.nonzero(lengths != lengths[0])[0][0])
        raise _fail(path, "vector", f"row {row} has {lengths[row]} values, row 0 has {lengths[0]}")
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
    width = int(lengths[0]) if len(lengths) else 0
    return Vectors(ids, _as_float(path, "vector", values.reshape(len(ids), width)), str(path))


def load_vector_pair(text_path: str, media_path: str) -> tuple[Vectors, Vectors]:
    """Text and media vectors, checked to have the same width."""
    text, media = load_vectors(text_path, "text_vectors"), load_vectors(media_path, "media_vectors")
    if text.vectors.shape[1] != media.vectors.shape[1]:
        raise FormatError(f"{media_path}: vectors: {media.vectors.shape[1]}-d, but the text vectors "
                          f"({text_path}) are {text.vectors.shape[1]}-d")
    return text, media


# ----------------------------------------------------------------------------------- scores
@dataclass
class ScoreMatrix:
    """Precomputed scores: ``scores`` (T, M) float32, rows ``text_ids``, columns ``media_ids``."""

    text_ids: list[str]
    media_ids: list[str]
    scores: torch.Tensor
    path: str


def load_scores(path: str) -> ScoreMatrix:
    """A texts x media score matrix from ``.npy`` (+ ``.text_ids.txt``, ``.media_ids.txt``),
    ``.safetensors`` or ``.parquet`` (see the module docstring)."""
    suffix = _suffix(path, VECTOR_SUFFIXES, "scores")
    if suffix == ".npy":
        arr = _npy(path, "scores", mmap=True)
        if arr.ndim != 2:
            raise _fail(path, "scores", f"must be 2-D (texts, media), got shape {arr.shape}")
        ids = []
        for tail, field, n, what in ((".text_ids.txt", "text_ids", arr.shape[0], "rows"),
                                     (".media_ids.txt", "media_ids", arr.shape[1], "columns")):
            f = _sibling(path, tail)
            if not f.exists():
                raise _fail(path, field, f"no ids file {f.name} beside it (one id per line)")
            ids.append(_ids_file(f))
            _check_ids(f, field, ids[-1], n, f"{what} of {input_path(path).name}")
        return ScoreMatrix(ids[0], ids[1], _as_float(path, "scores", arr), str(path))
    if suffix == ".safetensors":
        tensors, meta = _safetensors(path, ["scores"])
        s = tensors["scores"]
        if s.ndim != 2:
            raise _fail(path, "scores", f"must be 2-D (texts, media), got shape {tuple(s.shape)}")
        t_ids, m_ids = _meta_ids(path, meta, "text_ids"), _meta_ids(path, meta, "media_ids")
        _check_ids(path, "text_ids", t_ids, s.shape[0], "rows of scores")
        _check_ids(path, "media_ids", m_ids, s.shape[1], "columns of scores")
        return ScoreMatrix(t_ids, m_ids, _as_float(path, "scores", s), str(path))
    table = _parquet(path, ["text_id", "media_id", "score"])
    t_col = _string_ids(path, table["text_id"], "text_id")
    m_col = _string_ids(path, table["media_id"], "media_id")
    t_ids, m_ids = list(dict.fromkeys(t_col)), list(dict.fromkeys(m_col))
    ti = {t: i for i, t in enumerate(t_ids)}
    mi = {m: i for i, m in enumerate(m_ids)}
    rows = np.fromiter((ti[t] for t in t_col), np.int64, len(t_col))
    cols = np.fromiter((mi[m] for m in m_col), np.int64, len(m_col))
    flat = rows * len(m_ids) + cols
    uniq, first, count = np.unique(flat, return_index=True, return_counts=True)
    if (count > 1).any():
        j = int(first[np.argmax(count > 1)])
        raise _fail(path, "score", f"pair ({t_col[j]!r}, {m_col[j]!r}) appears more than once")
    if len(uniq) != len(t_ids) * len(m_ids):
        missing = len(t_ids) * len(m_ids) - len(uniq)
        raise _fail(path, "score", f"{missing} of the {len(t_ids)} x {len(m_ids)} (text, media) pairs "
                                   f"have no score (every pair needs one)")
    col = table["score"]
    if col.null_count:
        raise _fail(path, "score", f"row {col.is_null().combine_chunks().to_pylist().index(True)} is null")
    values = np.asarray(col.to_numpy())
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64) if np.issubdtype(values.dtype, np.integer) else values
    dense = np.empty(len(t_ids) * len(m_ids), np.float64)
    dense[flat] = values
    return ScoreMatrix(t_ids, m_ids, _as_float(path, "score", dense.reshape(len(t_ids), len(m_ids))),
                       str(path))


# ----------------------------------------------------------------------------------- relevance
@dataclass
class Captions:
    """The texts a feature artifact lists: caption id (``<item>#<k>``) -> (item id, text)."""

    of: dict[str, tuple[str, str]]

    @classmethod
    def load(cls, media_dir: Path) -> Captions:
        import pyarrow.parquet as pq

        items = pq.read_table(Path(media_dir) / "items.parquet", columns=["id", "texts"])
        of = {}
        for item, texts in zip(items["id"].to_pylist(), items["texts"].to_pylist()):
            for k, t in enumerate(texts or []):
                of[f"{item}#{k}"] = (item, t)
        return cls(of)

    def pairs(self) -> list[tuple[str, str]]:
        return [(c, item) for c, (item, _) in self.of.items()]


def load_pair_file(path: str) -> list[tuple[str, str]]:
    """(text id, media id) pairs from ``.parquet`` or ``.tsv`` with columns ``text_id``, ``media_id``."""
    suffix = _suffix(path, PAIR_SUFFIXES, "pairs")
    if suffix == ".parquet":
        table = _parquet(path, ["text_id", "media_id"])
        return list(zip(_string_ids(path, table["text_id"], "text_id"),
                        _string_ids(path, table["media_id"], "media_id")))
    lines = _read_bytes(path).decode("utf-8", errors="strict").splitlines()
    header = lines[0].split("\t") if lines else []
    for c in ("text_id", "media_id"):
        if c not in header:
            raise _fail(path, c, f"no such column in the header row (got {header})")
    t, m = header.index("text_id"), header.index("media_id")
    out = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) <= max(t, m):
            raise _fail(path, f"line {n}", f"{len(cells)} columns, the header has {len(header)}")
        out.append((cells[t], cells[m]))
    return out
