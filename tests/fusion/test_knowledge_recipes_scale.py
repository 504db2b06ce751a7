"""The knowledge recipes at scale (issues 22 and 27), without Ray: the stage's process reads only the
KG's Parquet footers, so its memory and what travels to the encoding actors and the training workers
stay flat as the KG grows, while each actor's ``encoder`` does hold what grows with it (the
measurement has teeth); the KG's counts reach the corpus once, with unit 0; every input reads the
same from a ``memory://`` URI as from a local folder."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from fusion.pretrain.loop import RECIPES, PretrainJob
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from tests.fusion.conftest import write_linked

SMALL, LARGE = 200, 20_000
TYPES = ["noun.animal", "noun.artifact", "noun.location"]   # WordNet lexnames: sensebert, libert, wklm
RECIPE_NAMES = ["kepler", "kgbert", "sensebert", "libert", "wklm", "knowbert", "sentilr"]
FLAT_BYTES = 256 * 1024    # what the stage's process may allocate beyond the small KG's run
GROWS_BYTES = 1024 * 1024  # what an actor's encoder holds more for the large KG (100x the entities)


def word(i: int, first: str = "w") -> str:
    """A distinct alphabetic word per ``i`` (the lexicons read alphabetic words only)."""
    out = ""
    while True:
        out, i = chr(97 + i % 26) + out, i // 26
        if not i:
            return first + out


def write_kg(root: Path, n: int) -> dict[str, str]:
    """A ``knowledge.ingest`` artifact of ``n`` synthetic synsets (a name, an alias, a description, a
    lexname each; a hypernym chain), its ``knowledge.embed`` vectors, and a VADER-format lexicon of
    ``n`` words, in ``root``: ``{"kg", "entities", "lexicon"}``. Table sizes grow with ``n``; the
    relation table does not."""
    kg, emb = root / "kg", root / "emb"
    for d in (kg, emb):
        d.mkdir(parents=True)
    ids = [f"s:{i}" for i in range(n)]
    KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": ids, "name": [word(i) for i in range(n)],
                  "aliases": [[word(i, "x")] for i in range(n)],
                  "description": [f"the thing number {i}" for i in range(n)],
                  "types": [[TYPES[i % 3]] for i in range(n)], "source": ["s"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": [0, 1, 2], "id": ["s:@", "s:near", "s:part"], "name": ["hypernym", "near", "part"],
                  "source": ["s"] * 3}, schema=RELATION_SCHEMA),
        pa.table({"head": list(range(n)), "relation": [i % 3 for i in range(n)],
                  "tail": [(i + 1) % n for i in range(n)], "split": ["train"] * n},
                 schema=TRIPLE_SCHEMA)).save(kg)
    save_file({"entity": torch.zeros(n, 8)}, str(emb / "embeddings.safetensors"))
    pq.write_table(pa.table({"idx": list(range(n)), "id": ids}), emb / "entities.parquet")
    lexicon = root / "lexicon.txt"
    lexicon.write_text("".join(f"{word(i)}\t{(-1) ** i * 1.5}\t0.5\t[1, 2]\n" for i in range(n)))
    return {"kg": str(kg), "entities": str(emb), "lexicon": str(lexicon)}


def write_text(root: Path) -> str:
    """Eight documents naming synthetic entities 0..3, linked."""
    docs, mentions = [], []
    for d in range(8):
        a, b = word(d % 4), word((d + 1) % 4)
        text = f"{a} is near {b} in the city"
        docs.append((f"d{d}", text))
        mentions += [(f"d{d}", 0, len(a), f"s:{d % 4}"),
                     (f"d{d}", text.index(f" {b}") + 1, text.index(f" {b}") + 1 + len(b), f"s:{(d + 1) % 4}")]
    return str(write_linked(root / "text", docs, mentions))


@pytest.fixture(scope="module")
def sizes(tmp_path_factory) -> dict[int, dict[str, str]]:
    root = tmp_path_factory.mktemp("scale")
    text = write_text(root)
    # equal-length folder names: any difference in the pickled job is the data's, not the path's
    return {n: {**write_kg(root / f"n{len(str(n)):02d}", n), "text": text} for n in (SMALL, LARGE)}


def setup(name: str, paths: dict[str, str]) -> tuple:
    """``(recipe, inputs it needs, options)``; sentilr's lexicon is its one input besides the text."""
    rec = RECIPES.get(name)()
    options = rec.Options.model_validate({"lexicon_path": paths["lexicon"]} if name == "sentilr" else {})
    return rec, {r: paths[r] for r in rec.needs}, options


def peak(fn, *args) -> tuple:
    """``(fn(*args), bytes of Python memory allocated at the peak of the call)``."""
    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def job_bytes(rec, options, resources: dict, inputs: dict[str, str]) -> tuple[int, int]:
    """The pickled training job (as ``pipeline.train.fit`` measures it) and the encoding actors'
    constructor arguments (as :func:`fusion.pretrain.corpus.build_corpus` passes them)."""
    job = PretrainJob(recipe_cls=type(rec), backbone="bb", options=options,
                      resources={"max_length": 32, **resources}, corpus_uri="state/corpus", max_length=32,
                      batch_size=4, bucket_batches=1, steps=1, lr=1e-3, warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, seed=0, threads_per_worker=1)
    actors = {"recipe_cls": type(rec), "options": options, "inputs": inputs, "tokenizer": "bb",
              "max_length": 32, "out_uri": "state/corpus"}
    return len(cloudpickle.dumps(job)), len(cloudpickle.dumps(actors))


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_stage_process_and_shipped_job_stay_flat_as_the_kg_grows(name, sizes, tokenizer):
    rec, small_in, small_opt = setup(name, sizes[SMALL])
    _, large_in, large_opt = setup(name, sizes[LARGE])
    rec.resources(small_in, small_opt)                     # warm: imports, fsspec's caches
    small, small_peak = peak(rec.resources, small_in, small_opt)
    large, large_peak = peak(rec.resources, large_in, large_opt)
    assert large_peak < small_peak + FLAT_BYTES, (small_peak, large_peak)
    # the same small things, whatever the size (KnowBERT's table by reference: its URI and shape)
    by_size = ("num_entities", "entities_uri")
    assert {k: v for k, v in large.items() if k not in by_size} == \
           {k: v for k, v in small.items() if k not in by_size}
    assert len(cloudpickle.dumps(large)) < 1024
    small_job, small_actors = job_bytes(rec, small_opt, small, small_in)
    large_job, large_actors = job_bytes(rec, large_opt, large, large_in)
    assert abs(large_job - small_job) <= 8 and large_actors == small_actors   # digits of a count at most
    # ... while an encoding actor does hold what grows with the KG: the measurement can fail
    rec.encoder(small_in, small_opt, tokenizer, 32)
    _, small_enc = peak(rec.encoder, small_in, small_opt, tokenizer, 32)
    _, large_enc = peak(rec.encoder, large_in, large_opt, tokenizer, 32)
    assert large_enc > small_enc + GROWS_BYTES, (small_enc, large_enc)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_the_kg_counts_come_once_with_unit_zero_and_finish_accepts_them(name, sizes, tokenizer):
    rec, inputs, options = setup(name, sizes[SMALL])
    resources = rec.resources(inputs, options)
    units = rec.units(inputs, options, None)
    state = rec.encoder(inputs, options, tokenizer, 32)
    _, first = rec.encode(state, inputs, units[0])
    _, again = rec.encode(state, inputs, {**units[0], "unit": 1})   # the same slice as another unit
    kg_keys = set(state.get("kg_counts", {}))
    assert kg_keys <= set(first) and not kg_keys & set(again)
    assert all(first[k] == v for k, v in state.get("kg_counts", {}).items())
    summed = dict(first)
    for k, v in again.items():
        summed[k] = summed.get(k, 0) + v
    rec.finish(dict(resources), summed)                   # a usable KG: no error


def to_memory(local: str, name: str) -> str:
    """A copy of a local file or folder at ``memory://<name>``."""
    import fsspec

    fs = fsspec.filesystem("memory")
    if Path(local).is_dir():
        for f in Path(local).iterdir():
            fs.pipe(f"/{name}/{f.name}", f.read_bytes())
    else:
        fs.pipe(f"/{name}", Path(local).read_bytes())
    return f"memory://{name}"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_input_reads_the_same_from_a_uri(name, sizes, tokenizer):
    paths = sizes[SMALL]
    remote = {k: to_memory(v, f"scale-{name}-{k}" + (".txt" if k == "lexicon" else ""))
              for k, v in paths.items()}
    got = []
    for where in (paths, remote):
        rec, inputs, options = setup(name, where)
        resources = rec.resources(inputs, options)
        if "entities_uri" in resources:                   # KnowBERT's table: by reference, as given
            assert resources.pop("entities_uri") == inputs["entities"]
        units = rec.units(inputs, options, None)
        rows, counts = rec.encode(rec.encoder(inputs, options, tokenizer, 32), inputs, units[0])
        got.append((resources, units, rows, dict(counts)))
    assert got[0] == got[1] and got[0][2]


@pytest.mark.parametrize("name", ["kepler", "kgbert", "sensebert", "libert", "wklm"])
def test_a_corpus_without_the_kg_counts_is_a_clear_error(name):
    """A corpus encoded before the KG's counts came with unit 0 (a run resumed across an upgrade)
    says so, instead of claiming the KG has nothing usable."""
    from pipeline import StageFailed

    rec = RECIPES.get(name)()
    with pytest.raises(StageFailed, match=f"{name}: the encoded corpus has no .* older stele"):
        rec.finish({"pairs_per_doc": 1}, {"documents": 3})
