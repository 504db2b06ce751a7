"""The pretraining corpus: examples encoded once by Ray Data actors, streamed by each Ray Train worker.

Nothing proportional to the corpus lives in the stage's process or travels in the training config:

1. **Units.** The input is cut into *units*, small descriptors of a slice of it (a recipe's
   :meth:`~fusion.pretrain.loop.Recipe.units`; for linked text, :func:`text_units`: documents
   ``[doc_start, doc_end)`` of ``docs.parquet`` and their mentions, rows ``[mention_start,
   mention_end)`` of ``mentions.parquet``, which ``knowledge.link`` writes in document order).
2. **Encoding** (:func:`build_corpus`): Ray Data sends the units to a pool of actors on any node;
   each actor builds the recipe's encoder once (tokenizer, entity index, K-BERT's triple lookup),
   reads its units from the input artifacts' URIs (fsspec: a local folder or ``s3://...``), encodes
   them (tokenisation, entity alignment, sentence trees) and writes ``part-<unit>.parquet`` into
   the corpus folder under the stage's state URI, which every node can reach. Only a row count and
   the recipe's counts per unit come back. ``corpus.json`` is written last: a killed run never
   leaves a corpus that looks complete, and a resumed run reuses a complete one.
3. **Streaming** (:class:`CorpusStream`): each worker reads its own share of every epoch, in a
   seeded order, a few parts at a time; masking and padding happen per batch in the worker.

Why the worker reads its share itself instead of ``ray.train.get_dataset_shard``: Ray Data's
``streaming_split`` hands blocks to whichever worker asks first, so which worker sees which example
depends on timing, and neither "resume at step s with exactly the data position of step s" nor a
bit-identical rerun could hold. Here the order is a function of (seed, epoch, rank, world size)
only: epoch e permutes the parts, lays their rows end to end, gives rank r the r-th of ``world``
equal contiguous chunks (each chunk touches about ``parts / world`` parts, so a worker reads its
share, not the corpus), and shuffles within windows of ``WINDOW`` parts (then, optionally, sorts
runs of a few batches by length: :func:`bucket_order`, or lays the rows of a recipe's groups end
to end, so that a batch holds whole groups: :func:`grouped_order`). The data position is
``(epoch, cursor)``, saved with every checkpoint. The stream runs on across epochs, so every
example is seen exactly once per epoch, none dropped at an epoch's end.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import StageFailed

CORPUS_FILE = "corpus.json"
UNIT_DOCS = 2048   # documents per unit: knowledge.link's row group, so a unit reads one of them
WINDOW = 4         # parts shuffled together: batches mix documents from several parts


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


# -------------------------------------------------------------------------- linked-text units
def text_units(text_uri: str, limit: int | None = None, unit_docs: int | None = None) -> list[dict]:
    """Units of a ``knowledge.link`` artifact: ``{"unit", "doc_start", "doc_end", "mention_start",
    "mention_end"}``. Streams the ``n_mentions`` column a row group at a time (memory stays flat
    whatever the corpus size); ``limit`` keeps the first N documents."""
    unit_docs = unit_docs or UNIT_DOCS
    fs, root = _fs(text_uri)
    units: list[dict] = []
    doc = mention = 0
    start_doc = start_mention = 0
    with fs.open(_join(root, "docs.parquet"), "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(columns=["n_mentions"], batch_size=unit_docs):
            counts = batch.column(0).to_numpy(zero_copy_only=False)
            for n in counts:
                if limit is not None and doc >= limit:
                    break
                doc += 1
                mention += int(n)
                if doc - start_doc == unit_docs:
                    units.append(_unit(len(units), start_doc, doc, start_mention, mention))
                    start_doc, start_mention = doc, mention
    if doc > start_doc:
        units.append(_unit(len(units), start_doc, doc, start_mention, mention))
    with fs.open(_join(root, "mentions.parquet"), "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    if rows < mention or (limit is None and rows != mention):
        raise StageFailed(f"{text_uri}: docs.parquet's n_mentions add up to {mention} but "
                          f"mentions.parquet has {rows} rows; the two do not line up: rebuild it "
                          f"with knowledge.link")
    return units


def _unit(i: int, d0: int, d1: int, m0: int, m1: int) -> dict:
    return {"unit": i, "doc_start": d0, "doc_end": d1, "mention_start": m0, "mention_end": m1}


def read_rows(fs: Any, path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, offset, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return pf.schema_arrow.empty_table().select(columns)
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def read_linked_docs(text_uri: str, unit: dict) -> list[dict]:
    """The documents of one unit: ``[{"id", "text", "mentions": [(start, end, entity_id), ...]}]``.

    Checks that ``mentions.parquet`` lines up with ``docs.parquet``'s ``n_mentions`` (the layout
    ``knowledge.link`` writes); a mismatch is a clear error, never a silent misalignment."""
    fs, root = _fs(text_uri)
    docs = read_rows(fs, _join(root, "docs.parquet"), unit["doc_start"], unit["doc_end"],
                     ["doc_id", "text", "n_mentions"])
    ments = read_rows(fs, _join(root, "mentions.parquet"), unit["mention_start"],
                      unit["mention_end"], ["doc_id", "start", "end", "entity_id"])
    ids, texts = docs["doc_id"].to_pylist(), docs["text"].to_pylist()
    counts = docs["n_mentions"].to_pylist()
    m_doc = ments["doc_id"].to_pylist()
    expected = [i for i, n in zip(ids, counts) for _ in range(n)]
    if m_doc != expected:
        at = next((k for k, (a, b) in enumerate(zip(m_doc, expected)) if a != b),
                  min(len(m_doc), len(expected)))
        raise StageFailed(
            f"{text_uri}: mentions.parquet does not line up with docs.parquet's n_mentions near "
            f"mention row {unit['mention_start'] + at} (documents {unit['doc_start']}.."
            f"{unit['doc_end'] - 1}); knowledge.link writes both in document order: rebuild it")
    out, k = [], 0
    starts, ends, ents = (ments[c].to_pylist() for c in ("start", "end", "entity_id"))
    for i, t, n in zip(ids, texts, counts):
        out.append({"id": i, "text": t,
                    "mentions": list(zip(starts[k:k + n], ends[k:k + n], ents[k:k + n]))})
        k += n
    return out


def load_linked_docs(text_uri: str, limit: int | None = None) -> list[dict]:
    """Every document of a ``knowledge.link`` artifact (the first ``limit``), in memory, as
    :func:`read_linked_docs` gives them: for consumers whose data is small (fine-tuning tasks)."""
    return [d for u in text_units(text_uri, limit) for d in read_linked_docs(text_uri, u)]


# --------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Corpus:
    """A complete encoded corpus: its folder's URI, examples per part, the recipe's summed counts."""

    uri: str
    sizes: tuple[int, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return sum(self.sizes)

    def part(self, unit: int) -> str:
        return _join(self.uri, f"part-{unit:06d}.parquet")

    @classmethod
    def load(cls, uri: str) -> Corpus | None:
        """The corpus at ``uri`` if it is complete (``corpus.json`` written), else None."""
        fs, root = _fs(uri)
        path = _join(root, CORPUS_FILE)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            meta = json.load(f)
        return cls(uri, tuple(meta["sizes"]), meta["counts"])


class EncodeUnits:
    """Ray Data actor: builds the recipe's encoder once, then encodes and writes units."""

    def __init__(self, recipe_cls: type, options: Any, inputs: dict[str, str], tokenizer: str,
                 max_length: int, out_uri: str):
        from fusion.models.backbone import load_tokenizer

        self.recipe = recipe_cls()
        self.state = self.recipe.encoder(inputs, options, load_tokenizer(tokenizer), max_length)
        self.inputs, self.out_uri = inputs, out_uri
        self.fs, self.root = _fs(out_uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        sizes, counts = [], []
        for unit in batch.to_pylist():
            rows, c = self.recipe.encode(self.state, self.inputs, unit)
            if rows:
                path = _join(self.root, f"part-{unit['unit']:06d}.parquet")
                with self.fs.open(path, "wb") as f:
                    pq.write_table(pa.Table.from_pylist(rows), f)
            sizes.append(len(rows))
            counts.append(json.dumps(dict(c)))
        return pa.table({"unit": batch["unit"], "rows": sizes, "counts": counts})


def build_corpus(recipe: Any, options: Any, inputs: dict[str, str], tokenizer: str,
                 max_length: int, units: list[dict], out_uri: str, log: Any = None) -> Corpus:
    """Encode ``units`` with ``recipe`` on a Ray Data actor pool into ``out_uri`` (see the module
    docstring), or return the complete corpus already there (a resumed run)."""
    import ray

    from pipeline.raydata import stream_map

    done = Corpus.load(out_uri)
    if done is not None and len(done.sizes) == len(units):
        if log:
            log.info("reusing the encoded corpus at %s (%d examples)", out_uri, done.examples)
        return done
    if not units:
        raise StageFailed("fusion.pretrain: the input has nothing to encode (no documents)")
    fs, root = _fs(out_uri)
    fs.makedirs(root, exist_ok=True)
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    actors = max(1, min(len(units), cpus, 8))
    sizes = [0] * len(units)
    counts: Counter = Counter()
    kwargs = {"recipe_cls": type(recipe), "options": options, "inputs": inputs,
              "tokenizer": tokenizer, "max_length": max_length, "out_uri": out_uri}
    tables = [pa.Table.from_pylist([u]) for u in units]  # one block per unit: every actor gets work
    # One unit (a small input: at most UNIT_DOCS documents, one feature shard) is encoded right
    # here: starting an actor pool would cost more than the work, and the memory is one unit's.
    outputs = ([EncodeUnits(**kwargs)(tables[0])] if len(units) == 1 else
               stream_map(tables, EncodeUnits, actors=actors, batch_size=1, calls_per_actor=2,
                          fn_kwargs=kwargs))
    for out in outputs:
        for u, n, c in zip(out["unit"].to_pylist(), out["rows"].to_pylist(),
                           out["counts"].to_pylist()):
            sizes[u] = n
            counts.update(json.loads(c))
    with fs.open(_join(root, CORPUS_FILE), "w") as f:  # last: the corpus is complete
        json.dump({"sizes": sizes, "counts": dict(counts)}, f)
    return Corpus(out_uri, tuple(sizes), dict(counts))


# -------------------------------------------------------------------------------- streaming
def epoch_plan(sizes: tuple[int, ...], epoch: int, seed: int, rank: int, world: int
               ) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s share of epoch ``epoch``: ``[(part, first, stop), ...]``, rows
    ``first..stop`` of each part's own seeded row order (see the module docstring)."""
    n = sum(sizes)
    lo, hi = rank * n // world, (rank + 1) * n // world
    plan, pos = [], 0
    for part in np.random.default_rng([seed, epoch]).permutation(len(sizes)):
        size = sizes[part]
        a, b = max(lo, pos), min(hi, pos + size)
        if a < b:
            plan.append((int(part), a - pos, b - pos))
        pos += size
    return plan


def bucket_order(order: np.ndarray, lengths: np.ndarray, batch: int, bucket: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Length bucketing: each run of ``bucket`` batches of ``order`` sorted by length, cut into
    batches, the batches shuffled; a batch then holds rows of similar length and pads less,
    while which rows an epoch holds is unchanged (a permutation of ``order``)."""
    out = []
    size = batch * bucket
    for c in range(0, len(order), size):
        chunk = order[c:c + size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        groups = [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
        out += [groups[g] for g in rng.permutation(len(groups))]
    return np.concatenate(out) if out else order


def grouped_order(keys: list[Any], rng: np.random.Generator) -> np.ndarray:
    """Row indices in which rows of equal ``keys`` are contiguous: the groups in a random order,
    each group's rows in a random order. Cut into batches, each batch holds whole groups (a group
    straddles two batches where the sizes do not divide), so an in-batch contrastive loss meets
    each row beside its group mates: TAS-B's topic-aware sampling (Hofstätter et al. 2021), with
    the groups given by the data instead of clustered."""
    groups: dict[Any, list[int]] = {}
    for i in rng.permutation(len(keys)):
        groups.setdefault(keys[i], []).append(int(i))
    members = list(groups.values())
    return np.array([i for g in rng.permutation(len(members)) for i in members[g]], dtype=np.int64)


class CorpusStream:
    """One worker's examples, batch after batch, epoch after epoch (see the module docstring).

    ``state`` is the loop's data position (``{"epoch", "cursor"}``, the cursor counting examples of
    this rank's share of the epoch); :meth:`batch` advances it, so a checkpoint taken after a step
    resumes exactly at the next example. ``keep`` drops rows a recipe decided not to train on
    (K-Adapter's rare labels); they still count as read. ``group`` (a row's group key) orders each
    window by :func:`grouped_order` instead of length bucketing; groups form within a window of
    ``WINDOW`` parts, so a group whose rows lie in parts of two windows is split."""

    def __init__(self, corpus: Corpus, seed: int, rank: int, world: int, state: dict[str, int],
                 keep: Callable[[dict], bool] | None = None,
                 length: Callable[[dict], int] | None = None, batch: int = 1, bucket: int = 1,
                 group: Callable[[dict], Any] | None = None):
        if corpus.examples < world:
            raise StageFailed(f"{corpus.examples} examples cannot feed {world} workers")
        self.corpus, self.seed, self.rank, self.world = corpus, seed, rank, world
        self.state, self.keep = state, keep
        self.length, self.batch_size, self.bucket, self.group = length, batch, bucket, group
        self._rows: Iterator[dict] = self._epoch_rows()

    def batch(self, size: int) -> list[dict]:
        out: list[dict] = []
        share = (self.rank + 1) * self.corpus.examples // self.world \
            - self.rank * self.corpus.examples // self.world
        misses = 0
        while len(out) < size:
            row = next(self._rows, None)
            if row is None:  # this rank's share of the epoch is done: on to the next epoch
                self.state["epoch"], self.state["cursor"] = self.state["epoch"] + 1, 0
                self._rows = self._epoch_rows()
                continue
            self.state["cursor"] += 1
            if self.keep is None or self.keep(row):
                out.append(row)
                misses = 0
            elif (misses := misses + 1) > share:  # a whole epoch and nothing to train on
                raise StageFailed(f"rank {self.rank}: none of the {share} examples of its share "
                                  f"is kept by the recipe")
        return out

    def _epoch_rows(self) -> Iterator[dict]:
        epoch, skip = self.state["epoch"], self.state["cursor"]
        plan = epoch_plan(self.corpus.sizes, epoch, self.seed, self.rank, self.world)
        windows = [plan[i:i + WINDOW] for i in range(0, len(plan), WINDOW)]
        pending = self._fetch(windows[0], epoch) if windows else None
        for w, window in enumerate(windows):
            rows = pending.result()
            pending = self._fetch(windows[w + 1], epoch) if w + 1 < len(windows) else None
            rng = np.random.default_rng([self.seed, epoch, self.rank, w])
            order = rng.permutation(len(rows))
            if self.group is not None:
                order = grouped_order([self.group(r) for r in rows], rng)
            elif self.length is not None and self.bucket > 1:
                lengths = np.array([self.length(r) for r in rows])
                order = bucket_order(order, lengths, self.batch_size, self.bucket, rng)
            if skip >= len(rows):  # resuming past this window: nothing of it to yield
                skip -= len(rows)
                continue
            for i in order[skip:]:
                yield rows[i]
            skip = 0

    def _fetch(self, window: list[tuple[int, int, int]], epoch: int) -> Any:
        """Read a window's rows on a background thread while the current one trains."""
        from concurrent.futures import Future

        fut: Future = Future()

        def run() -> None:
            try:
                fs, _ = _fs(self.corpus.uri)
                rows: list[dict] = []
                for part, a, b in window:
                    order = np.random.default_rng([self.seed, epoch, part]).permutation(
                        self.corpus.sizes[part])[a:b]
                    with fs.open(self.corpus.part(part), "rb") as f:
                        rows += pq.read_table(f).take(order).to_pylist()
                fut.set_result(rows)
            except BaseException as e:  # noqa: BLE001 - raised again in the training loop
                fut.set_exception(e)

        threading.Thread(target=run, daemon=True).start()
        return fut
