"""``knowledge.link``: entity mentions in a text corpus, from a KnowledgeGraph's names and aliases.

Input role ``kg`` (a KnowledgeGraph artifact); the text comes from a file outside the store (JSONL, a
Parquet file or a Hugging Face dataset folder saved with ``save_to_disk``), a local path or any
fsspec URI (``s3://bucket/docs.jsonl``), so its size and mtime (ETag or checksum on a URI) are
part of the cache key (see :func:`_fingerprint`). Writes::

    mentions.parquet   doc_id, start, end, surface, entity_idx, entity_id, score, n_candidates
                       (start/end: code-point offsets into docs.text, end exclusive)
    docs.parquet       doc_id, text, n_mentions (every usable document, with or without mentions)
    top_entities.csv   the most linked entities and their mention counts
    quarantine.json    unusable input records (file:line and reason), with on_error: skip

The matching rules and their reasons are in :mod:`knowledge.link`.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipeline import Input, StageContext, StageFailed, stage
from pipeline.uris import ResolvedInput, URIPath, input_fingerprint, input_path

from ..kg import KnowledgeGraph
from ..link import ENGLISH_STOPWORDS, Gazetteer
from ..sources.base import Quarantine, read_lines

MENTION_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("surface", pa.string()),
    ("entity_idx", pa.int32()), ("entity_id", pa.string()), ("score", pa.float32()),
    ("n_candidates", pa.int32()),
])
DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("n_mentions", pa.int32())])
WRITE_EVERY = 2048  # documents per Parquet row group: bounded memory on corpora of any size


class LinkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A local path is made absolute, so the Ray worker (another cwd) reads the same file the planner
    # fingerprinted; a URI is kept as written.
    text: ResolvedInput = Field(
        description="JSONL file (.jsonl/.json/.ndjson, optionally .gz), Parquet file, or a Hugging "
                    "Face dataset folder (datasets.save_to_disk); a path or a URI (s3://...)")
    format: Literal["auto", "jsonl", "parquet", "hf"] = Field(
        default="auto", description="auto: a folder is a HF dataset, else by file suffix")
    split: str | None = Field(default=None, description="split of a HF DatasetDict (needed when it "
                                                        "has several)")
    text_field: str = "text"
    id_field: str = Field(default="id", description="document id; the 0-based row number when a "
                                                    "record lacks it")
    prior: Literal["degree", "uniform"] = Field(
        default="degree", description="ambiguity prior: 1 + degree in the train triples, or uniform")
    min_length: int = Field(default=3, ge=1, description="shortest surface linked (normalised chars)")
    stopwords: Literal["english", "none"] = Field(
        default="english", description="surfaces never linked: a built-in English list, or none")
    extra_stopwords: list[str] = Field(default=[], description="more surfaces never linked")
    lowercase: bool = Field(default=True, description="case-insensitive matching (case folding)")
    fold_quotes: bool = Field(default=True, description="match ’ and ' alike")
    max_candidates: int | None = Field(
        default=None, ge=1, description="leave out surfaces naming more entities than this")
    on_error: Literal["raise", "skip"] = Field(
        default="raise", description="bad records (malformed JSON, missing/empty text, undecodable "
                                     "bytes, duplicate id): raise on the first, or skip and count")


def _fingerprint(params: LinkParams) -> str:
    """Size and mtime of the text file (of every file, for a dataset folder; size and ETag or
    checksum on a URI): edited text re-links."""
    return input_fingerprint(params.text)


def _format(path: Path | URIPath, fmt: str) -> str:
    if not path.exists():
        raise StageFailed(f"knowledge.link: text {path} does not exist")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    raise StageFailed(f"knowledge.link: cannot tell the format of {path} from its suffix; set "
                      f"format: jsonl | parquet | hf")


class _Reader:
    """Yields ``(where, doc_id, text)`` of usable records; everything else goes to the quarantine."""

    def __init__(self, params: LinkParams, q: Quarantine):
        self.p, self.q = params, q
        self.path = input_path(params.text)
        self.fmt = _format(self.path, params.format)
        self.blank_lines = 0
        self.seen: set[str] = set()
        self.total: int | None = None  # rows, when the format knows it up front
        self.table: Any = None
        self._file: Any = None  # the open remote Parquet file
        if self.fmt == "parquet":
            if isinstance(self.path, URIPath):
                self._file = self.path.open("rb")
            self.table = pq.ParquetFile(self._file or self.path)
            self.cols = self._columns(self.table.schema_arrow.names)
            self.total = self.table.metadata.num_rows
        elif self.fmt == "hf":
            self.table = self._load_hf()
            self.cols = self._columns(list(self.table.column_names))
            self.total = self.table.num_rows

    def _check(self, where: str, row: int, rid: Any, text: Any, raw: str = "") -> tuple | None:
        f = self.p.text_field
        if text is None:
            self.q.bad(where, f"missing text field {f!r}", raw)
            return None
        if not isinstance(text, str):
            self.q.bad(where, f"text field {f!r} is {type(text).__name__}, not a string", raw)
            return None
        if not text.strip():
            self.q.bad(where, f"empty text field {f!r}", raw)
            return None
        doc_id = str(row) if rid is None else str(rid)
        if doc_id in self.seen:
            # Mentions are joined to docs by doc_id: a repeated id would attach them to both.
            self.q.bad(where, f"duplicate document id {doc_id!r}", raw)
            return None
        self.seen.add(doc_id)
        return where, doc_id, text

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        return {"jsonl": self._jsonl, "parquet": self._parquet, "hf": self._hf}[self.fmt]()

    def _jsonl(self) -> Iterator[tuple[str, str, str]]:
        # read_lines quarantines undecodable lines with file:line and keeps reading.
        for no, line in read_lines(self.path, self.q):
            if not line.strip():
                self.blank_lines += 1  # counted in the metrics; not a record
                continue
            where = f"{self.path}:{no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self.q.bad(where, f"malformed JSON ({e.msg} at column {e.colno})", line)
                continue
            if not isinstance(obj, dict):
                self.q.bad(where, f"not a JSON object ({type(obj).__name__})", line)
                continue
            rec = self._check(where, no - 1, obj.get(self.p.id_field), obj.get(self.p.text_field),
                              line)
            if rec is not None:
                yield rec

    def _columns(self, names: list[str]) -> list[str]:
        if self.p.text_field not in names:
            raise StageFailed(f"knowledge.link: {self.path} has no column {self.p.text_field!r} "
                              f"(text_field); columns: {', '.join(names)}")
        return [self.p.text_field] + ([self.p.id_field] if self.p.id_field in names else [])

    def _rows(self, batches: Iterator[dict[str, list]]) -> Iterator[tuple[str, str, str]]:
        row = 0
        for batch in batches:
            texts = batch[self.p.text_field]
            ids = batch.get(self.p.id_field) or [None] * len(texts)
            for text, rid in zip(texts, ids):
                rec = self._check(f"{self.path}:row {row}", row, rid, text)
                row += 1
                if rec is not None:
                    yield rec

    def _parquet(self) -> Iterator[tuple[str, str, str]]:
        yield from self._rows(b.to_pydict()
                              for b in self.table.iter_batches(batch_size=4096, columns=self.cols))

    def _hf(self) -> Iterator[tuple[str, str, str]]:
        yield from self._rows(self.table.select_columns(self.cols).iter(batch_size=4096))

    def _load_hf(self) -> Any:
        import datasets

        try:
            ds = datasets.load_from_disk(str(self.path))
        except FileNotFoundError as e:
            raise StageFailed(f"knowledge.link: {self.path} is not a saved Hugging Face dataset "
                              f"({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            name = self.p.split or (splits[0] if len(splits) == 1 else None)
            if name not in ds:
                raise StageFailed(f"knowledge.link: {self.path} holds splits {splits}; set split: "
                                  f"to one of them")
            ds = ds[name]
        elif self.p.split is not None:
            raise StageFailed(f"knowledge.link: {self.path} is a single dataset; remove split:")
        return ds


class _Writer:
    def __init__(self, out: Path):
        self.mentions = pq.ParquetWriter(out / "mentions.parquet", MENTION_SCHEMA)
        self.docs = pq.ParquetWriter(out / "docs.parquet", DOC_SCHEMA)
        self.m: dict[str, list] = {f: [] for f in MENTION_SCHEMA.names}
        self.d: dict[str, list] = {f: [] for f in DOC_SCHEMA.names}

    def add(self, doc_id: str, text: str, mentions: list) -> None:
        for m in mentions:
            self.m["doc_id"].append(doc_id)
            for f, v in zip(MENTION_SCHEMA.names[1:], m):
                self.m[f].append(v)
        self.d["doc_id"].append(doc_id)
        self.d["text"].append(text)
        self.d["n_mentions"].append(len(mentions))
        if len(self.d["doc_id"]) >= WRITE_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.d["doc_id"]:
            self.docs.write_table(pa.table(self.d, schema=DOC_SCHEMA))
            self.mentions.write_table(pa.table(self.m, schema=MENTION_SCHEMA))
            for v in (*self.m.values(), *self.d.values()):
                v.clear()

    def close(self) -> None:
        self.flush()
        self.mentions.close()
        self.docs.close()


@stage("knowledge.link", version="2", fingerprint=_fingerprint,
       headline=("documents", "mentions", "linked_entities", "ambiguous_share"),
       inputs={"kg": Input("knowledge.ingest", "the graph whose entity names and aliases are "
                                               "found in the text")})
def link(ctx: StageContext, params: LinkParams) -> dict:
    """Find the KG's entity names and aliases in a text corpus (mentions with exact character
    offsets, for ERNIE-style alignment)."""
    if "kg" not in ctx.inputs:
        raise StageFailed(f"knowledge.link needs an input with role 'kg' (a KnowledgeGraph artifact); "
                          f"got {sorted(ctx.inputs) or 'none'}")
    kg = KnowledgeGraph.load(ctx.inputs["kg"].path)
    stop = (set(ENGLISH_STOPWORDS) if params.stopwords == "english" else set())
    stop |= set(params.extra_stopwords)
    t0 = time.perf_counter()
    gaz = Gazetteer.from_kg(kg, prior=params.prior, min_length=params.min_length, stopwords=stop,
                            lowercase=params.lowercase, fold_quotes=params.fold_quotes,
                            max_candidates=params.max_candidates)
    build_s = time.perf_counter() - t0
    ctx.log.info("gazetteer: %s (%.2f s)", gaz.stats, build_s)

    q = Quarantine("knowledge.link", params.on_error)
    reader = _Reader(params, q)
    writer = _Writer(ctx.out)
    docs = n_mentions = ambiguous = n_bytes = with_mentions = 0
    linked: Counter[int] = Counter()
    link_s = 0.0
    t_all = time.perf_counter()
    try:
        # JSONL has no row count up front (counting would read the file twice): no total there.
        for _where, doc_id, text in ctx.progress(reader, total=reader.total, desc="link"):
            t = time.perf_counter()
            mentions = gaz.link(text)
            link_s += time.perf_counter() - t
            writer.add(doc_id, text, mentions)
            docs += 1
            n_bytes += len(text.encode("utf-8"))
            n_mentions += len(mentions)
            with_mentions += bool(mentions)
            for m in mentions:
                linked[m.entity_idx] += 1
                ambiguous += m.n_candidates > 1
    finally:
        writer.close()
        reader.close()
    wall = time.perf_counter() - t_all
    if docs == 0:
        raise StageFailed(f"knowledge.link: no usable documents in {params.text} "
                          f"({q.count} quarantined: {q.by_reason})")

    ids = kg.entities["id"].to_pylist()
    names = kg.entities["name"].to_pylist()
    with open(ctx.out / "top_entities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity_idx", "entity_id", "name", "mentions"])
        for idx, c in linked.most_common(100):
            w.writerow([idx, ids[idx], names[idx], c])
    quarantine = q.summary()
    (ctx.out / "quarantine.json").write_text(json.dumps(quarantine, indent=1, ensure_ascii=False))
    mb = n_bytes / 1e6
    return {
        "documents": docs,
        "mentions": n_mentions,
        "mentions_per_doc": n_mentions / docs,
        "docs_with_mentions": with_mentions,
        "linked_entities": len(linked),
        "ambiguous_share": ambiguous / n_mentions if n_mentions else 0.0,
        "text_mb": mb,
        "mb_per_s": mb / link_s if link_s > 0 else None,          # matching only
        "mb_per_s_total": mb / wall if wall > 0 else None,        # reading + matching + writing
        "gazetteer": {**gaz.stats, "build_s": build_s},
        "blank_lines": reader.blank_lines,
        "quarantine": {"count": quarantine["count"], "by_reason": quarantine["by_reason"],
                       "examples": quarantine["examples"][:5]},
    }
