"""WKLM: same-type entity replacement (rate, uniform draw, what it cannot replace), mention
boundaries after the text changes, MLM at 5% never inside mentions, the replacement loss against
its equation, and one tiny ``fusion.pretrain`` run on a typed KG artifact."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from fusion.models.objectives import IGNORE
from fusion.models.wklm import (ReplacementIndex, Span, Wklm, WklmConfig, doc_rng, encode_wklm,
                                replace_mentions)
from fusion.pretrain.extra_recipes import WklmOptions, WklmRecipe
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from tests.fusion.conftest import run_pretrain, write_linked
from tests.fusion.test_sensebert import falls

# (id, name, types): "apple" is the only company, "ceo" has no type
ENTITIES = [
    ("e:tim_cook", "tim cook", ["person"]), ("e:steve_jobs", "steve jobs", ["person"]),
    ("e:beijing", "beijing", ["city"]), ("e:paris", "paris", ["city"]),
    ("e:london", "london", ["city"]), ("e:berlin", "berlin", ["city"]),
    ("e:china", "china", ["country"]), ("e:france", "france", ["country"]),
    ("e:england", "england", ["country"]), ("e:germany", "germany", ["country"]),
    ("e:apple", "apple", ["company"]), ("e:ceo", "ceo", []),
]
# (text, [(surface, entity id)]): "born" is linked to an entity the KG lacks
DOCS = [
    ("tim cook is visiting beijing now", [("tim cook", "e:tim_cook"), ("beijing", "e:beijing")]),
    ("apple was founded by steve jobs", [("apple", "e:apple"), ("steve jobs", "e:steve_jobs")]),
    ("paris is the capital of france", [("paris", "e:paris"), ("france", "e:france")]),
    ("london is the capital of england", [("london", "e:london"), ("england", "e:england")]),
    ("the ceo of apple was born in berlin", [("ceo", "e:ceo"), ("apple", "e:apple"),
                                             ("born", "e:missing"), ("berlin", "e:berlin")]),
]
# per pass over DOCS, by hand
LABELLED, NO_SAME_TYPE, WITHOUT_TYPE, NOT_IN_KG = 8, 2, 1, 1


def mentions_of(text: str, surfaces: list[tuple[str, str]]) -> list[tuple[int, int, str]]:
    return [(text.index(s), text.index(s) + len(s), e) for s, e in surfaces]


def index() -> ReplacementIndex:
    return ReplacementIndex([e[0] for e in ENTITIES], [e[1] for e in ENTITIES], [e[2] for e in ENTITIES])


def write_typed_kg(out: Path) -> Path:
    """:data:`ENTITIES` as a ``knowledge.ingest`` artifact (one unused relation, no triples)."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(ENTITIES)
    KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [e[0] for e in ENTITIES], "name": [e[1] for e in ENTITIES],
                  "aliases": [[] for _ in ENTITIES], "description": [""] * n,
                  "types": [e[2] for e in ENTITIES], "source": ["test"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": [0], "id": ["r:0"], "name": ["related"], "source": ["test"]},
                 schema=RELATION_SCHEMA),
        pa.table({"head": [], "relation": [], "tail": [], "split": []}, schema=TRIPLE_SCHEMA)).save(out)
    return out


# ------------------------------------------------------------------------------------ replacement
def test_replacement_counts_what_it_cannot_replace():
    counts: Counter = Counter()
    for text, surfaces in DOCS:
        replace_mentions(text, mentions_of(text, surfaces), index(), doc_rng(0, text), 0.5, counts)
    assert counts["mentions_no_same_type_entity"] == NO_SAME_TYPE          # apple, twice
    assert counts["mentions_without_type"] == WITHOUT_TYPE                 # ceo
    assert counts["mentions_not_in_kg"] == NOT_IN_KG                       # born
    assert counts["mentions_replaced"] + counts["mentions_original"] == LABELLED


def test_replaced_text_and_spans_line_up():
    text, surfaces = DOCS[4]
    ms = mentions_of(text, surfaces)
    new, spans = replace_mentions(text, ms, index(), doc_rng(0, "x"), prob=1.0)
    assert [s.original for s in spans] == [None, None, None, 0]    # only berlin can be replaced
    assert new[spans[3].start:spans[3].end] in {"beijing", "paris", "london"}
    assert new[:spans[3].start] == text[:ms[3][0]]                 # everything before is untouched
    same, spans0 = replace_mentions(text, ms, index(), doc_rng(0, "x"), prob=0.0)
    assert same == text and [s.original for s in spans0] == [None, None, None, 1]
    assert [(s.start, s.end) for s in spans0] == [m[:2] for m in ms]
    # overlapping mentions keep the first; an identical name never counts as a replacement
    c: Counter = Counter()
    replace_mentions("tim cook", [(0, 8, "e:tim_cook"), (4, 8, "e:tim_cook")], index(),
                     doc_rng(0, "y"), 1.0, c)
    assert c["mentions_overlapping"] == 1 and c["mentions_replaced"] == 1
    twins = ReplacementIndex(["a", "b", "c"], ["Paris", "paris", "Lyon"], [["city"]] * 3)
    assert {twins.draw(0, doc_rng(0, str(k))) for k in range(50)} == {2}
    assert ReplacementIndex(["a", "b"], ["x", "X"], [["t"], ["t"]]).draw(0, doc_rng(0, "z")) is None


def test_replacement_rate_is_half_and_the_draw_uniform_over_the_type():
    text, surfaces = DOCS[2]                                     # paris (city), france (country)
    ms = mentions_of(text, surfaces)
    counts: Counter = Counter()
    drawn: Counter = Counter()
    for k in range(3000):
        new, spans = replace_mentions(text, ms, index(), doc_rng(7, f"d{k}"), 0.5, counts)
        if spans[0].original == 0:
            drawn[new[spans[0].start:spans[0].end]] += 1
    n = counts["mentions_replaced"] + counts["mentions_original"]
    assert n == 6000
    assert abs(counts["mentions_replaced"] / n - 0.5) < 4 * math.sqrt(0.25 / n)
    assert set(drawn) == {"beijing", "london", "berlin"}          # the city's type, never paris itself
    m = sum(drawn.values())
    assert all(abs(v / m - 1 / 3) < 4 * math.sqrt(2 / 9 / m) for v in drawn.values())
    # the same seed and document give the same text, whoever encodes it
    assert replace_mentions(text, ms, index(), doc_rng(7, "d1"))[0] == \
        replace_mentions(text, ms, index(), doc_rng(7, "d1"))[0]


def test_encode_wklm_marks_boundaries_and_counts_truncation(tokenizer):
    text = "tim cook is visiting beijing now"
    spans = [Span(0, 8, 0), Span(21, 28, 1)]
    ex = encode_wklm(text, spans, tokenizer, 32)
    tokens = tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert [tokens[s] for s in ex.mention_start] == ["tim", "beijing"]
    assert [tokens[e] for e in ex.mention_end] == ["cook", "beijing"]
    assert ex.mention_original == [0, 1]
    assert [t for t, m in zip(tokens, ex.in_mention) if m] == ["tim", "cook", "beijing"]
    short = encode_wklm(text, spans + [Span(3, 4, None)], tokenizer, 5)   # [CLS] tim cook is [SEP]
    assert short.mention_start == [1] and short.counts == {"mentions_labelled": 1,
                                                           "mentions_truncated": 1}
    cut = encode_wklm(text, spans, tokenizer, 3)                          # [CLS] tim [SEP]
    assert cut.mention_start == [] and cut.counts == {"mentions_truncated": 2}   # "tim cook" is cut


# ------------------------------------------------------------------------------------ masking, loss
def test_mlm_is_five_percent_and_never_inside_mentions(backbone):
    model = Wklm(backbone)
    g = torch.Generator().manual_seed(0)
    B, L = 256, 64
    ids = torch.randint(5, 60, (B, L), generator=g)
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -6:] = False
    in_mention = torch.rand(B, L, generator=g) < 0.3
    _, labels = model.mask({"input_ids": ids, "maskable": maskable, "in_mention": in_mention}, g)
    chosen = labels != IGNORE
    assert not chosen[in_mention].any() and not chosen[~maskable].any()
    free = maskable & ~in_mention
    n = int(free.sum())
    assert abs(int(chosen[free].sum()) / n - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)


def _batch(tokenizer, copies: int = 2, seed: int = 0) -> dict:
    rec = WklmRecipe()
    state = {"tokenizer": tokenizer, "max_length": 32, "options": WklmOptions(replacement_seed=seed),
             "index": index()}
    docs = [{"id": f"d{k}", "text": t, "mentions": mentions_of(t, s)}
            for k, (t, s) in enumerate(DOCS * copies)]
    rows, _ = rec.encode_docs(state, docs)
    return rec.collate(SimpleNamespace(tokenizer=tokenizer), rows, {}, None, 32)


def test_model_loss_is_mlm_plus_the_replacement_cross_entropy(backbone, tokenizer):
    model = Wklm(backbone, WklmConfig(mask_prob=0.3, replacement_weight=0.6)).eval()
    batch = _batch(tokenizer, copies=3)
    y = batch["mention_original"]
    assert len(y) == 3 * LABELLED and 0 < int(y.sum()) < len(y)
    out = model.loss(batch, torch.Generator().manual_seed(5))
    ids, labels = model.mask(batch, torch.Generator().manual_seed(5))
    hidden = model.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    at = labels != IGNORE
    mlm = torch.nn.functional.cross_entropy(model.mlm(hidden[at]), labels[at])
    w, c = model.replacement.weight[0], model.replacement.bias[0]
    rep = 0.0
    for b, s, e, orig in zip(*(batch[k].tolist() for k in ("mention_batch", "mention_start",
                                                           "mention_end", "mention_original"))):
        p = torch.sigmoid(w @ torch.cat([hidden[b, s], hidden[b, e]]) + c)
        rep = rep - (orig * torch.log(p) + (1 - orig) * torch.log(1 - p)) / len(y)
    for got, want in ((out["mlm"], mlm), (out["replacement"], rep), (out["total"], mlm + 0.6 * rep)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_batch_without_mentions_trains_mlm_only(backbone, tokenizer):
    model = Wklm(backbone)
    rows = [{"input_ids": tokenizer("the city and the river")["input_ids"],
             "special_tokens_mask": [1, 0, 0, 0, 0, 0, 1], "in_mention": [0] * 7, "mention_start": [],
             "mention_end": [], "mention_original": []}] * 4
    batch = WklmRecipe().collate(SimpleNamespace(tokenizer=tokenizer), rows, {}, None, 32)
    out = model.loss(batch, torch.Generator().manual_seed(0))
    assert out["replacement"].item() == 0
    out["total"].backward()
    assert model.replacement.weight.grad is not None


def test_the_replacement_head_learns_a_fixed_batch(backbone, tokenizer):
    """Gradients reach the classifier and the encoder: a fixed batch is memorised well below the
    chance loss log 2."""
    torch.manual_seed(0)
    model = Wklm(backbone, WklmConfig(replacement_weight=1.0))
    batch = _batch(tokenizer, copies=2, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        out = model.loss(batch, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert model.loss(batch, torch.Generator().manual_seed(0))["replacement"].item() < 0.3


# ------------------------------------------------------------------------------ the recipe, end to end
def test_wklm_recipe_pretrains_and_counts_mentions(ray_local, tmp_path, tokenizer):
    from fusion.models.backbone import random_backbone

    kg, link, bb = write_typed_kg(tmp_path / "kg"), tmp_path / "link", tmp_path / "bb"
    copies = 4
    docs = [(f"d{k}", DOCS[k % len(DOCS)][0]) for k in range(copies * len(DOCS))]
    ments = [(d, *mentions_of(t, DOCS[k % len(DOCS)][1])[j])
             for k, (d, t) in enumerate(docs) for j in range(len(DOCS[k % len(DOCS)][1]))]
    write_linked(link, docs, ments)
    random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64).model.save_pretrained(str(bb))
    tokenizer.save_pretrained(str(bb))
    metrics, out = run_pretrain(tmp_path, "pt", {"text": link, "kg": kg}, {
        "backbone": str(bb), "steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
        "checkpoint_every": 20, "max_length": 32, "recipe": "wklm", "options": {"mask_prob": 0.1}})
    hist = json.loads((out / "history.json").read_text())
    assert metrics["mentions_labelled"] == copies * LABELLED
    assert metrics["mentions_no_same_type_entity"] == copies * NO_SAME_TYPE
    assert metrics["mentions_without_type"] == copies * WITHOUT_TYPE
    assert metrics["mentions_not_in_kg"] == copies * NOT_IN_KG
    assert metrics["entity_types_replaceable"] == 3                       # person, city, country
    assert {"loss_mlm", "loss_replacement", "loss_total"} <= set(hist[0])
    assert all(math.isfinite(h["loss_total"]) for h in hist) and falls(hist, "loss_mlm", 5)
    # the artifact rebuilds into the same model, and fine-tunes as its base, mlm
    from fusion.finetune.encoders import SPAN_ENCODERS, span_encoder_for
    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.loop import build_pretrained

    meta = json.loads((out / "recipe.json").read_text())
    _, opts, model = build_pretrained(out, artifact_backbone(out), meta["resources_meta"])
    assert isinstance(model, Wklm) and opts.mask_prob == 0.1
    assert span_encoder_for("wklm") is SPAN_ENCODERS.get("mlm")


def test_options_validate():
    with pytest.raises(ValueError):
        WklmOptions(replace_prob=1.5)
    assert WklmOptions().mask_prob == 0.05 and WklmOptions().replace_prob == 0.5
