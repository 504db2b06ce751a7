"""SenseBERT: the WordNet supersense lexicon and its lookup, whole-word masking rates, the
allowed-senses loss against its equation, the supersense input embedding, words without a sense,
and one tiny ``fusion.pretrain`` run on a WordNet-like KG artifact."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from fusion.models.objectives import IGNORE
from fusion.models.sensebert import (SUPERSENSES, SenseBert, SenseBertConfig, SenseLexicon,
                                     bits_to_multi_hot, encode_senses, piece_senses,
                                     sense_bits, supersense_loss,
                                     whole_word_mask)
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from tests.fusion.conftest import TEXT_RUN, run_pretrain, write_linked

# A WordNet-like KG as knowledge.ingest writes it: (id, name, aliases, lexname)
SYNSETS = [
    ("wordnet:dog.n.01", "dog", ["domestic dog"], "noun.animal"),
    ("wordnet:dog.n.03", "dog", ["frump"], "noun.person"),
    ("wordnet:chase.v.01", "chase", ["dog"], "verb.motion"),
    ("wordnet:cat.n.01", "cat", [], "noun.animal"),
    ("wordnet:animal.n.01", "animal", ["beast", "brute"], "noun.Tops"),
    ("wordnet:river.n.01", "river", [], "noun.object"),
    ("wordnet:city.n.01", "city", ["metropolis"], "noun.location"),
    ("wordnet:country.n.02", "country", ["state", "land"], "noun.location"),
    ("wordnet:capital.n.03", "capital", [], "noun.location"),
    ("wordnet:company.n.01", "company", [], "noun.group"),
    ("wordnet:people.n.01", "people", [], "noun.group"),
    ("wordnet:music.n.01", "music", [], "noun.communication"),
    ("wordnet:art.n.01", "art", ["fine art"], "noun.act"),
    ("wordnet:apple.n.01", "apple", [], "noun.food"),
    ("wordnet:red.a.01", "red", ["reddish"], "adj.all"),
    ("wordnet:green.a.01", "green", [], "adj.all"),
    ("wordnet:found.v.01", "found", ["establish"], "verb.creation"),
    ("wordnet:president.n.01", "president", [], "noun.person"),
    ("countryinfo:FR", "france", ["french republic"], "country"),  # another source: no lexname
]
HYPERNYMS = [("dog.n.01", "animal.n.01"), ("cat.n.01", "animal.n.01"),
             ("capital.n.03", "city.n.01"), ("president.n.01", "people.n.01")]
SENTENCES = ["the dog and the cat are animals", "paris is the capital of france",
             "apple was founded by steve jobs", "the red river in the green country",
             "people in the city have music and art ."]
# per sentence (with a supersense, alphabetic without one, not alphabetic), by hand:
# dog cat animals | capital | apple founded | red river green country | people city music art
PER_SENTENCE = [(3, 4, 0), (1, 5, 0), (2, 4, 0), (4, 3, 0), (4, 4, 1)]


def write_tiny_wordnet(out: Path) -> Path:
    """:data:`SYNSETS` and :data:`HYPERNYMS` as a ``knowledge.ingest`` artifact (relations ``@``
    hypernym and ``~`` hyponym, the latter unused)."""
    out.mkdir(parents=True, exist_ok=True)
    index = {s[0]: i for i, s in enumerate(SYNSETS)}
    n = len(SYNSETS)
    KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [s[0] for s in SYNSETS], "name": [s[1] for s in SYNSETS],
                  "aliases": [s[2] for s in SYNSETS], "description": [""] * n,
                  "types": [[s[3]] for s in SYNSETS], "source": [s[0].split(":")[0] for s in SYNSETS]},
                 schema=ENTITY_SCHEMA),
        pa.table({"idx": [0, 1], "id": ["wordnet:@", "wordnet:~"], "name": ["hypernym", "hyponym"],
                  "source": ["wordnet", "wordnet"]}, schema=RELATION_SCHEMA),
        pa.table({"head": [index[f"wordnet:{h}"] for h, _ in HYPERNYMS], "relation": [0] * len(HYPERNYMS),
                  "tail": [index[f"wordnet:{t}"] for _, t in HYPERNYMS],
                  "split": ["train"] * len(HYPERNYMS)}, schema=TRIPLE_SCHEMA)).save(out)
    return out


def lexicon() -> SenseLexicon:
    return SenseLexicon.from_synsets(([s[1], *s[2]], [s[3]]) for s in SYNSETS)[0]


# ------------------------------------------------------------------------------------ lexicon
def test_lexicon_counts_what_it_leaves_out():
    lex, counts = SenseLexicon.from_synsets(([s[1], *s[2]], [s[3]]) for s in SYNSETS)
    assert counts["synsets_with_supersense"] == len(SYNSETS) - 1
    assert counts["entities_without_supersense"] == 1                      # france (countryinfo)
    assert counts["lemmas_multiword"] == 2                                 # domestic dog, fine art
    assert "french republic" not in {lemma for lemma, _ in lex.table}


def test_allowed_supersenses_follow_morphy_per_part_of_speech():
    lex = lexicon()
    dog = sense_bits(["noun.animal", "noun.person", "verb.motion"])
    assert lex.allowed("dog") == dog
    assert lex.allowed("Dogs") == dog                    # lower-cased; noun and verb "-s"
    assert lex.allowed("chased") == sense_bits(["verb.motion"])            # verb "-ed" -> "-e"
    assert lex.allowed("founded") == sense_bits(["verb.creation"])         # verb "-ed" -> ""
    assert lex.allowed("cities") == sense_bits(["noun.location"])          # noun "-ies" -> "-y"
    assert lex.allowed("greener") == sense_bits(["adj.all"])               # adjective "-er"
    assert lex.allowed("rivering") == 0                  # "-ing" is a verb rule; river is a noun
    assert lex.allowed("the") == 0 and lex.allowed("france") == 0
    assert bits_to_multi_hot(torch.tensor(dog)).nonzero().flatten().tolist() == sorted(
        SUPERSENSES.index(n) for n in ("noun.animal", "noun.person", "verb.motion"))


def test_encode_senses_labels_words_and_counts_those_without(tokenizer):
    ex = encode_senses("The dogs chased a cat, 42 times!", tokenizer, 32, lexicon())
    tokens = tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert tokens[:4] == ["[CLS]", "the", "dog", "##s"]
    dog = lexicon().allowed("dogs")
    # the word's allowed set on each of its pieces; a word starts once, special tokens are no word
    assert ex.senses[:5] == [0, 0, dog, dog, sense_bits(["verb.motion"])]
    assert ex.word_start == [0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0]
    assert ex.counts == {"words_with_supersense": 3, "words_without_supersense": 3,  # the a times
                         "words_not_alphabetic": 3}                                  # , 42 !


def test_piece_senses_of_a_padded_batch_match_single_rows(tokenizer):
    texts = ["the dogs chased a cat", "red"]
    enc = tokenizer(texts, padding=True)
    for b, t in enumerate(texts):
        one = encode_senses(t, tokenizer, 32, lexicon())
        starts, senses = piece_senses(enc, b, t, lexicon())
        n = len(one.input_ids)
        assert (starts[:n], senses[:n]) == (one.word_start, one.senses)
        assert not any(starts[n:]) and not any(senses[n:])                 # padding: no word


# ------------------------------------------------------------------------------------ masking
def test_whole_word_mask_rates_and_units():
    g = torch.Generator().manual_seed(0)
    B, L, V = 256, 64, 50
    MASK = V  # outside the random draws' range, so a masked piece is never a random one
    ids = torch.randint(5, V, (B, L), generator=g)
    word_start = torch.rand(B, L, generator=g) < 0.6
    word_start[:, 1] = True                                      # the first real token starts a word
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, 0] = False                                       # [CLS]
    maskable[:, -8:] = False                                     # padding
    wm = whole_word_mask(ids, word_start, maskable, MASK, V, g)
    starts = word_start & maskable
    chosen_words = wm.chosen & starts
    n_words, n_chosen = int(starts.sum()), int(chosen_words.sum())
    sd = math.sqrt(0.15 * 0.85 / n_words)
    assert abs(n_chosen / n_words - 0.15) < 4 * sd
    assert not wm.chosen[~maskable].any()
    # every piece follows the first piece of its word: chosen together, corrupted alike
    owner = torch.cummax(torch.where(starts, torch.arange(L).expand(B, L), 0), 1).values
    assert torch.equal(wm.chosen[maskable], chosen_words.gather(1, owner)[maskable])
    masked = wm.chosen & (wm.input_ids == MASK)
    assert torch.equal(masked[maskable], masked.gather(1, owner)[maskable] & wm.chosen[maskable])
    kept = chosen_words & (wm.input_ids == ids) & ~masked
    shares = [int((chosen_words & masked).sum()) / n_chosen, int(kept.sum()) / n_chosen]
    sd_b = math.sqrt(0.16 / n_chosen)
    assert abs(shares[0] - 0.8) < 4 * sd_b
    assert abs(shares[1] - (0.1 + 0.1 / V)) < 4 * math.sqrt(0.09 / n_chosen)  # a random draw may equal
    assert torch.equal(wm.labels, torch.where(wm.chosen, ids, torch.full_like(ids, IGNORE)))
    assert torch.equal(wm.input_ids[~wm.chosen], ids[~wm.chosen])
    assert not (wm.changed & ~wm.chosen).any() and not (wm.chosen & (wm.input_ids != ids) & ~wm.changed).any()
    # changed yet equal: only a random draw that hit the original id (about 1 in V of 10%)
    assert int((wm.changed & (wm.input_ids == ids)).sum()) < 0.01 * int(wm.chosen.sum())


# ------------------------------------------------------------------------------------ the loss
def test_supersense_loss_matches_its_equation():
    g = torch.Generator().manual_seed(1)
    N, S = 40, len(SUPERSENSES)
    logits = torch.randn(N, S, generator=g) * 3
    allowed = torch.rand(N, S, generator=g) < 0.1
    allowed[torch.arange(N), torch.randint(S, (N,), generator=g)] = True     # at least one each
    got_allowed, got_reg = supersense_loss(logits, allowed)
    want_allowed = want_reg = 0.0
    for n in range(N):
        z = sum(math.exp(v) for v in logits[n].tolist())
        p = [math.exp(v) / z for v in logits[n].tolist()]
        a = [s for s in range(S) if allowed[n, s]]
        want_allowed += -math.log(sum(p[s] for s in a)) / N
        want_reg += -sum(math.log(p[s]) for s in a) / len(a) / N
    assert got_allowed.item() == pytest.approx(want_allowed, rel=1e-5)
    assert got_reg.item() == pytest.approx(want_reg, rel=1e-5)
    one = allowed.clone().zero_()
    one[:, 3] = True                                   # one allowed sense: both are cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, torch.full((N,), 3))
    assert all(t.item() == pytest.approx(ce.item(), rel=1e-5) for t in supersense_loss(logits, one))


def _batch(tokenizer, texts: list[str]) -> dict:
    from fusion.pretrain.lexical_recipes import SenseBertRecipe

    lex = lexicon()
    rows = [encode_senses(t, tokenizer, 32, lex) for t in texts]
    rows = [{"input_ids": r.input_ids, "special_tokens_mask": r.special_tokens_mask,
             "word_start": r.word_start, "senses": r.senses} for r in rows]
    return SenseBertRecipe().collate(SimpleNamespace(tokenizer=tokenizer), rows, {}, None, 32)


def test_input_embedding_adds_the_allowed_supersenses(backbone, tokenizer):
    model = SenseBert(backbone, SenseBertConfig())
    batch = _batch(tokenizer, ["the dogs chased a cat"])
    words = backbone.model.get_input_embeddings()(batch["input_ids"])
    want = bits_to_multi_hot(batch["senses"]).float() @ model.sense_embeddings.weight
    torch.testing.assert_close(model.embed(batch["input_ids"], batch["senses"]) - words, want)
    assert want[0, 2].abs().sum() > 0 and want[0, 1].abs().sum() == 0        # dog: senses; the: none
    off = SenseBert(backbone, SenseBertConfig(sense_input=False))
    torch.testing.assert_close(off.embed(batch["input_ids"], batch["senses"]), words)


def test_model_loss_is_mlm_plus_both_supersense_terms(backbone, tokenizer):
    model = SenseBert(backbone, SenseBertConfig(mask_prob=0.5, regularizer_weight=0.7)).eval()
    batch = _batch(tokenizer, SENTENCES * 2)
    out = model.loss(batch, torch.Generator().manual_seed(3))
    # the same masking again, then the equations by hand
    wm = whole_word_mask(batch["input_ids"], batch["word_start"], batch["maskable"],
                         tokenizer.mask_token_id, len(tokenizer), torch.Generator().manual_seed(3), 0.5)
    hidden = model(wm.input_ids, batch["attention_mask"], batch["senses"].masked_fill(wm.changed, 0))
    at = wm.labels != IGNORE
    mlm = torch.nn.functional.cross_entropy(model.mlm(hidden[at]), wm.labels[at])
    words = wm.chosen & batch["word_start"].bool() & (batch["senses"] != 0)
    assert words.sum() > 3
    logp = torch.log_softmax(model.sense_head(hidden[words]), -1)
    allowed = bits_to_multi_hot(batch["senses"][words])
    slm = -torch.stack([logp[n][allowed[n]].exp().sum().log() for n in range(len(logp))]).mean()
    reg = -torch.stack([logp[n][allowed[n]].mean() for n in range(len(logp))]).mean()
    for got, want in ((out["mlm"], mlm), (out["slm"], slm), (out["slm_reg"], reg),
                      (out["total"], mlm + slm + 0.7 * reg)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_words_without_a_sense_get_mlm_only(backbone, tokenizer):
    model = SenseBert(backbone, SenseBertConfig(mask_prob=0.9))
    batch = _batch(tokenizer, ["the a of in", "is was by and"])          # no word has a supersense
    assert not batch["senses"].any()
    out = model.loss(batch, torch.Generator().manual_seed(0))
    assert out["slm"].item() == 0 and out["slm_reg"].item() == 0 and out["mlm"].item() > 0
    out["total"].backward()                                              # the graph stays whole
    assert model.sense_head.dense.weight.grad is not None


# ------------------------------------------------------------------------------ the recipe, end to end
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    from fusion.models.backbone import random_backbone

    root = tmp_path_factory.mktemp("sensebert")
    kg, link, bb = write_tiny_wordnet(root / "kg"), root / "link", root / "bb"
    write_linked(link, [(f"d{i}", SENTENCES[i % len(SENTENCES)]) for i in range(20)], [])
    random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64).model.save_pretrained(str(bb))
    tokenizer.save_pretrained(str(bb))
    return {"kg": kg, "text": link, "backbone": bb}


def run_recipe(tmp: Path, artifacts: dict[str, Path], **params) -> tuple[dict, list]:
    """``fusion.pretrain`` on ``artifacts``' text and kg (as tests/fusion/test_recipes.py runs it)."""
    metrics, out = run_pretrain(tmp, "pt", {r: artifacts[r] for r in ("text", "kg")},
                                TEXT_RUN | {"backbone": str(artifacts["backbone"])} | params)
    return metrics, json.loads((out / "history.json").read_text())


def falls(hist: list[dict], key: str, window: int = 8) -> bool:
    """The mean of the last ``window`` non-zero values is below that of the first ones."""
    vals = [h[key] for h in hist if h[key] != 0.0]
    return sum(vals[-window:]) / window < sum(vals[:window]) / window


def test_sensebert_recipe_pretrains_and_counts_words_without_sense(ray_local, tmp_path, artifacts):
    metrics, hist = run_recipe(tmp_path, artifacts, recipe="sensebert", options={"mask_prob": 0.3})
    copies = 20 // len(SENTENCES)
    assert metrics["words_with_supersense"] == copies * sum(c[0] for c in PER_SENTENCE)
    assert metrics["words_without_supersense"] == copies * sum(c[1] for c in PER_SENTENCE)
    assert metrics["words_not_alphabetic"] == copies * sum(c[2] for c in PER_SENTENCE)
    assert metrics["entities_without_supersense"] == 1 and metrics["num_supersenses"] == 45
    assert {"loss_mlm", "loss_slm", "loss_slm_reg", "loss_total"} <= set(hist[0])
    assert falls(hist, "loss_slm") and falls(hist, "loss_total")
    # the artifact rebuilds into the same model, every weight in place
    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.loop import build_pretrained

    out = tmp_path / "pt"   # run_recipe's stage folder
    meta = json.loads((out / "recipe.json").read_text())
    _, opts, model = build_pretrained(out, artifact_backbone(out), meta["resources_meta"])
    assert isinstance(model, SenseBert) and opts.mask_prob == 0.3

    # fine-tuning reads it with its supersense input, the lexicon rebuilt from the kg artifact
    import torch

    from fusion.finetune.encoders import EncoderSource, span_encoder_for
    from fusion.finetune.tasks import TaskExample
    from fusion.models.sensebert import SenseLexicon, encode_senses
    from fusion.pretrain.lexical_recipes import synset_rows
    from knowledge.kg import KnowledgeGraph

    kg = KnowledgeGraph.load(artifacts["kg"])
    src = EncoderSource("sensebert", out, meta["options"], artifact_backbone(out), 32, 32, kg, None)
    enc = span_encoder_for("sensebert")(src)
    text = SENTENCES[0]
    ex = TaskExample("e", "d", text, (), ((0, 3),), ("x",), "x", "y")
    batch = enc.collate([ex])
    lexicon, _ = SenseLexicon.from_synsets(synset_rows(str(artifacts["kg"])))
    row = encode_senses(text, artifact_backbone(out).tokenizer, 32, lexicon)
    assert batch["senses"][0].tolist() == row.senses and any(row.senses)
    with torch.no_grad():                  # dropout off in both to compare
        ids = torch.tensor([row.input_ids])
        want = model.eval()(ids, torch.ones_like(ids), torch.tensor([row.senses]))
        got = enc.module.eval()(batch["input_ids"], batch["attention_mask"], batch["senses"])
    torch.testing.assert_close(got, want)
    assert enc.coverage([ex])["sensebert_words_with_supersense"] == PER_SENTENCE[0][0]


@pytest.mark.skipif(not os.environ.get("STELE_DATA"), reason="needs STELE_DATA with wordnet/")
def test_real_wordnet_gives_all_45_supersenses():
    from knowledge.sources.base import Quarantine
    from knowledge.sources.wordnet import WordNetSource

    root = Path(os.environ["STELE_DATA"]) / "wordnet"
    if not (root / "data.noun").is_file():
        pytest.skip(f"{root} has no WordNet")
    ents = WordNetSource(path=str(root)).entities(Quarantine("wordnet"))
    lex, counts = SenseLexicon.from_synsets(([e.name, *e.aliases], e.types) for e in ents)
    assert counts["entities_without_supersense"] == 0
    seen = 0
    for bits in lex.table.values():
        seen |= bits
    assert seen == (1 << len(SUPERSENSES)) - 1           # every lexname is one of SUPERSENSES
    # dog: the animal, a person (frump, cad), a frank, two artifacts (pawl, andiron), to chase
    assert lex.allowed("dogs") == sense_bits(["noun.animal", "noun.person", "noun.food",
                                              "noun.artifact", "verb.motion"])
    assert lex.allowed("the") == 0
