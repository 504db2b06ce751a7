"""SentiLR: the polarity lexicon (a tiny in-test one; VADER's when ``vaderSentiment`` is installed),
words outside it neutral and counted, the POS heuristic, distant sentence labels, label-aware
masking rates, the joint loss against its equations, and one tiny ``fusion.pretrain`` run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fusion.models.objectives import IGNORE
from fusion.models.sentilr import (NEGATIVE, NEUTRAL, POLARITY_UNKNOWN, POS_TAGS, POS_UNKNOWN, POSITIVE,
                                   PolarityLexicon, SentiLr, SentiLrConfig, encode_sentilr, heuristic_pos,
                                   label_aware_mask, sentence_polarity)
from fusion.pretrain.extra_recipes import SentiLrOptions, SentiLrRecipe
from tests.fusion.conftest import SPECIAL, SUBWORDS, WORDS, run_pretrain, write_linked
from tests.fusion.test_sensebert import falls

LEXICON = {"good": 1.9, "great": 3.1, "bad": -2.5, "terrible": -2.1, "love": 3.2, "hate": -2.7,
           "happy": 2.7, "sad": -2.1, "meh": -0.3}
EXTRA = "good great bad terrible love hate movie food service beautiful but this happy sad".split()
SENTENCES = ["i love this movie and the food was great", "the service was terrible and i hate it",
             "the movie was good but the food was bad", "the city is beautiful", "he was born in paris"]
# per sentence by hand: (positive words, negative words, words not in the lexicon, sentence label)
PER_SENTENCE = [(2, 0, 7, POSITIVE), (0, 2, 6, NEGATIVE), (1, 1, 7, NEGATIVE), (0, 0, 4, NEUTRAL),
                (0, 0, 5, NEUTRAL)]


@pytest.fixture(scope="module")
def senti_tokenizer():
    from transformers import BertTokenizer

    words = SPECIAL + sorted(set(WORDS) | set(EXTRA)) + SUBWORDS
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


@pytest.fixture()
def senti_backbone(senti_tokenizer):
    from fusion.models.backbone import random_backbone

    return random_backbone(senti_tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64, max_position=64, seed=0)


def write_lexicon(path: Path, entries: dict[str, float] = LEXICON) -> Path:
    """VADER's format: token, mean valence, standard deviation, the raters' scores (CRLF lines)."""
    path.write_text("".join(f"{w}\t{v}\t0.5\t[1, 2]\r\n" for w, v in entries.items()), encoding="utf-8")
    return path


def lexicon() -> PolarityLexicon:
    return PolarityLexicon(LEXICON)


# ------------------------------------------------------------------------------------ the lexicon
def test_lexicon_file_loads_and_names_a_bad_line(tmp_path):
    lex = PolarityLexicon.from_file(write_lexicon(tmp_path / "lex.txt"))
    assert lex.valence == LEXICON and len(lex) == len(LEXICON)
    bad = tmp_path / "bad.txt"
    bad.write_text("good\t1.9\t0.1\t[]\nbroken line\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        PolarityLexicon.from_file(bad)


def test_words_not_in_the_lexicon_are_neutral_and_the_threshold_applies():
    lex = lexicon()
    assert lex.polarity("Good") == POSITIVE and lex.polarity("terrible") == NEGATIVE
    assert lex.polarity("river") == NEUTRAL and lex.score("river") is None
    assert lex.polarity("meh") == NEGATIVE
    assert PolarityLexicon(LEXICON, threshold=0.5).polarity("meh") == NEUTRAL
    assert sentence_polarity([1.9, -2.5]) == NEGATIVE and sentence_polarity([]) == NEUTRAL
    assert sentence_polarity([1.9, -1.5], margin=0.5) == NEUTRAL
    assert sentence_polarity([1.9, -1.5], margin=0.3) == POSITIVE


def test_heuristic_pos():
    tag = {w: POS_TAGS[heuristic_pos(w)] for w in
           ("slowly", "beautiful", "the", "Was", "running", "movie", "42", "happiness", ",", "very")}
    assert tag == {"slowly": "adv", "beautiful": "adj", "the": "other", "Was": "verb",
                   "running": "verb", "movie": "noun", "42": "other", "happiness": "noun",
                   ",": "other", "very": "adv"}


def test_encode_sentilr_labels_words_and_counts_those_outside_the_lexicon(senti_tokenizer):
    for text, (pos, neg, out, label) in zip(SENTENCES, PER_SENTENCE):
        ex = encode_sentilr(text, senti_tokenizer, 32, lexicon())
        assert (ex.counts["words_positive"], ex.counts["words_negative"],
                ex.counts["words_not_in_lexicon"]) == (pos, neg, out), text
        assert ex.sentence_label == label
        assert ex.counts[f"sentence_{['negative', 'neutral', 'positive'][label]}"] == 1
    ex = encode_sentilr("The movies were great!", senti_tokenizer, 32, lexicon())
    tokens = senti_tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert tokens == ["[CLS]", "the", "movie", "##s", "were", "great", "[UNK]", "[SEP]"]   # ! not in vocab
    assert ex.word_start == [0, 1, 1, 0, 1, 1, 1, 0]
    # a word's labels on each of its pieces; special tokens unknown; "movies" is not "movie"
    assert ex.polarity == [POLARITY_UNKNOWN, NEUTRAL, NEUTRAL, NEUTRAL, NEUTRAL, POSITIVE, NEUTRAL,
                           POLARITY_UNKNOWN]
    assert [POS_TAGS[p] if p < POS_UNKNOWN else None for p in ex.pos] == [
        None, "other", "noun", "noun", "verb", "noun", "other", None]
    assert ex.counts["words_not_in_lexicon"] == 4 and ex.counts["words_positive"] == 1


# ------------------------------------------------------------------------------------ masking
def test_sentiment_words_are_masked_at_their_own_rate():
    g = torch.Generator().manual_seed(0)
    B, L, V = 512, 48, 50
    ids = torch.randint(5, V, (B, L), generator=g)
    word_start = torch.rand(B, L, generator=g) < 0.7
    polarity = torch.randint(0, 3, (B, L), generator=g)
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -4:] = False
    polarity[~maskable] = POLARITY_UNKNOWN
    batch = {"input_ids": ids, "word_start": word_start, "maskable": maskable, "polarity": polarity}
    cfg = SentiLrConfig(mask_prob=0.15, sentiment_mask_prob=0.4, early_fusion_share=0.3)
    m = label_aware_mask(batch, cfg, V, V, g)
    starts = word_start & maskable
    for which, rate in (((polarity != NEUTRAL) & starts, 0.4), ((polarity == NEUTRAL) & starts, 0.15)):
        n = int(which.sum())
        assert abs(int(m.chosen[which].sum()) / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    assert not m.chosen[~maskable].any()
    assert abs(float(m.early.float().mean()) - 0.3) < 4 * math.sqrt(0.21 / B)
    assert torch.equal(m.labels, torch.where(m.chosen, ids, torch.full_like(ids, IGNORE)))


# ------------------------------------------------------------------------------------ the model
def _batch(tokenizer, texts: list[str]) -> dict:
    rows = []
    for t in texts:
        ex = encode_sentilr(t, tokenizer, 32, lexicon())
        rows.append({"input_ids": ex.input_ids, "special_tokens_mask": ex.special_tokens_mask,
                     "word_start": ex.word_start, "pos": ex.pos, "polarity": ex.polarity,
                     "sentence_label": ex.sentence_label})
    return SentiLrRecipe().collate(SimpleNamespace(tokenizer=tokenizer), rows, {}, None, 32)


def test_input_embedding_adds_pos_polarity_and_sentence_label(senti_backbone, senti_tokenizer):
    model = SentiLr(senti_backbone)
    b = _batch(senti_tokenizer, SENTENCES[:2])
    words = senti_backbone.model.get_input_embeddings()(b["input_ids"])
    got = model.embed(b["input_ids"], b["pos"], b["polarity"], b["sentence_label"]) - words
    want = (model.pos_embeddings.weight[b["pos"]] + model.polarity_embeddings.weight[b["polarity"]]
            + model.sentence_embeddings.weight[b["sentence_label"]][:, None])
    torch.testing.assert_close(got, want)


def test_model_loss_matches_its_equations(senti_backbone, senti_tokenizer):
    cfg = SentiLrConfig(mask_prob=0.4, sentiment_mask_prob=0.7, pos_weight=0.5, polarity_weight=0.8,
                        sentence_weight=0.3)
    model = SentiLr(senti_backbone, cfg).eval()
    batch = _batch(senti_tokenizer, SENTENCES * 2)
    out = model.loss(batch, torch.Generator().manual_seed(4))
    m = label_aware_mask(batch, cfg, senti_tokenizer.mask_token_id, len(senti_tokenizer),
                         torch.Generator().manual_seed(4))
    assert 0 < int(m.early.sum()) < len(m.early)
    # by hand: changed words show unknown POS and polarity; late rows an unknown sentence label
    pos_in, pol_in = batch["pos"].clone(), batch["polarity"].clone()
    pos_in[m.changed], pol_in[m.changed] = POS_UNKNOWN, POLARITY_UNKNOWN
    sent_in = torch.where(m.early, batch["sentence_label"], POLARITY_UNKNOWN)
    hidden = model(m.input_ids, batch["attention_mask"], pos_in, pol_in, sent_in)

    def ce(logits: torch.Tensor, target: list[int]) -> torch.Tensor:
        return -torch.stack([torch.log_softmax(z, -1)[t] for z, t in zip(logits, target)]).mean()

    at = m.labels != IGNORE
    mlm = ce(model.mlm(hidden[at]), m.labels[at].tolist())
    first = m.chosen & batch["word_start"].bool()
    pos = ce(model.pos_head(hidden[first]), batch["pos"][first].tolist())
    early_words = first & m.early[:, None]
    pol = ce(model.polarity_head(hidden[early_words]), batch["polarity"][early_words].tolist())
    late = [b for b in range(len(m.early)) if not m.early[b]]
    cls = torch.stack([hidden[b, 0] for b in late])
    sent = ce(model.sentence_head(torch.tanh(model.sentence_pool(cls))),
              [int(batch["sentence_label"][b]) for b in late])
    for got, want in ((out["mlm"], mlm), (out["pos"], pos), (out["polarity"], pol),
                      (out["sentence"], sent), (out["total"], mlm + 0.5 * pos + 0.8 * pol + 0.3 * sent)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_all_rows_early_fusion_gives_no_sentence_loss_and_a_whole_graph(senti_backbone, senti_tokenizer):
    model = SentiLr(senti_backbone, SentiLrConfig(early_fusion_share=1.0))
    out = model.loss(_batch(senti_tokenizer, SENTENCES), torch.Generator().manual_seed(0))
    assert out["sentence"].item() == 0 and out["polarity"].item() > 0
    out["total"].backward()
    assert model.sentence_head.weight.grad is not None


# ------------------------------------------------------------------------------------ VADER
def test_vader_lexicon_from_the_package():
    pytest.importorskip("vaderSentiment")
    lex = PolarityLexicon.from_vader()
    assert len(lex) > 7000
    assert lex.polarity("good") == POSITIVE and lex.polarity("terrible") == NEGATIVE
    assert lex.polarity("river") == NEUTRAL


# ------------------------------------------------------------------------------ the recipe, end to end
COPIES = 4


@pytest.fixture(scope="module")
def pretrained(ray_local, tmp_path_factory, senti_tokenizer):
    """One tiny ``fusion.pretrain`` run of the recipe: (artifact folder, lexicon file, metrics)."""
    from fusion.models.backbone import random_backbone

    tmp_path = tmp_path_factory.mktemp("sentilr")
    link, bb = tmp_path / "link", tmp_path / "bb"
    write_linked(link, [(f"d{k}", SENTENCES[k % len(SENTENCES)]) for k in range(COPIES * len(SENTENCES))],
                 [])
    random_backbone(senti_tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64).model.save_pretrained(str(bb))
    senti_tokenizer.save_pretrained(str(bb))
    lex = write_lexicon(tmp_path / "lexicon.txt")
    metrics, out = run_pretrain(tmp_path, "pt", {"text": link}, {
        "backbone": str(bb), "steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
        "checkpoint_every": 20, "max_length": 32, "recipe": "sentilr", "options": {"lexicon_path": str(lex)}})
    return out, lex, metrics


def test_sentilr_recipe_pretrains_and_counts_words(pretrained):
    out, lex, metrics = pretrained
    hist = json.loads((out / "history.json").read_text())
    assert metrics["words_positive"] == COPIES * sum(c[0] for c in PER_SENTENCE)
    assert metrics["words_negative"] == COPIES * sum(c[1] for c in PER_SENTENCE)
    assert metrics["words_not_in_lexicon"] == COPIES * sum(c[2] for c in PER_SENTENCE)
    assert metrics["sentence_neutral"] == COPIES * 2 and metrics["lexicon_entries"] == len(LEXICON)
    assert {"loss_mlm", "loss_pos", "loss_polarity", "loss_sentence", "loss_total"} <= set(hist[0])
    assert all(math.isfinite(h["loss_total"]) for h in hist)
    assert falls(hist, "loss_mlm") and falls(hist, "loss_total")
    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.loop import build_pretrained

    meta = json.loads((out / "recipe.json").read_text())
    _, opts, model = build_pretrained(out, artifact_backbone(out), meta["resources_meta"])
    assert isinstance(model, SentiLr) and opts.lexicon_path == str(lex)


def test_sentilr_span_encoder_reads_the_input_it_pretrained_on(pretrained, tmp_path):
    """Fine-tuning's features are the pretrained model's forward on the recipe's own POS and
    polarity inputs, sentence polarity unknown (eval mode, padded batch vs one row at a time)."""
    from fusion.finetune.encoders import EncoderSource, span_encoder_for
    from fusion.finetune.tasks import TaskExample
    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.loop import build_pretrained

    import shutil

    out, lex, _ = pretrained
    meta = json.loads((out / "recipe.json").read_text())
    art = tmp_path / "artifact"                    # a copy: the module's artifact stays as the stage left it
    shutil.copytree(out, art)
    SentiLrRecipe().save_files({}, SentiLrOptions.model_validate(meta["options"]), art)  # as the stage does
    moved = {**meta["options"], "lexicon_path": str(lex) + ".gone"}   # the lexicon file is not here
    # fine-tuning reads the copy in the artifact, wherever the options' file went
    src = EncoderSource("sentilr", art, moved, artifact_backbone(art), 32, 32, None, None)
    enc = span_encoder_for("sentilr")(src)
    assert enc.lexicon.valence == PolarityLexicon.from_file(lex).valence
    examples = [TaskExample("a", "d0", SENTENCES[0], (), ((2, 6),), ("x",), "x", "y"),      # love
                TaskExample("b", "d3", SENTENCES[3], (), ((4, 8),), ("x",), "x", "y"),      # city
                TaskExample("c", "d0", SENTENCES[0], (), ((35, 40),), ("x",), "x", "y")]    # great
    batch = enc.collate(examples)
    _, _, model = build_pretrained(out, artifact_backbone(out), meta["resources_meta"])
    model.eval()
    enc.module.eval()
    tokenizer = artifact_backbone(out).tokenizer
    with torch.no_grad():
        got, spans = enc.token_features(batch), enc(batch)                        # (B, L, D), (B, 1, D)
        for b, ex in enumerate(examples):
            row = encode_sentilr(ex.text, tokenizer, 32, PolarityLexicon.from_file(lex))
            n = len(row.input_ids)
            assert batch["pos"][b, :n].tolist() == row.pos
            assert batch["polarity"][b, :n].tolist() == row.polarity
            assert (batch["pos"][b, n:] == POS_UNKNOWN).all()                          # padding
            assert (batch["polarity"][b, n:] == POLARITY_UNKNOWN).all()
            ids, pos, pol = (torch.tensor([v]) for v in (row.input_ids, row.pos, row.polarity))
            want = model(ids, torch.ones_like(ids), pos, pol, torch.tensor([POLARITY_UNKNOWN]))   # (1, n, D)
            torch.testing.assert_close(got[b, :n], want[0])
            torch.testing.assert_close(spans[b, 0], want[0, int(batch["span_index"][b, 0])])
            # the sentence polarity input is not inert: a given label changes the features
            told = model(ids, torch.ones_like(ids), pos, pol, torch.tensor([POSITIVE]))
            assert not torch.allclose(told, want)
    assert POSITIVE in batch["polarity"][0].tolist()                        # love, great
    # counted once per document, "i love this movie ..." and "the city is beautiful"
    assert enc.coverage(examples) == {
        "sentilr_words_in_lexicon": 2, "sentilr_words_positive": 2, "sentilr_words_negative": 0,
        "sentilr_words_neutral": 0, "sentilr_words_not_in_lexicon": PER_SENTENCE[0][2] + PER_SENTENCE[3][2]}
    enc.set_trainable(False)
    assert enc.parameters() == []
    enc.set_trainable(True)
    trainable = {n.split(".")[0] for n, p in enc.module.named_parameters() if p.requires_grad}
    assert trainable == {"encoder", "pos_embeddings", "polarity_embeddings"}
    # fine-tuning's loop moves E_P and E_Q, never the frozen sentence embedding E_L
    from fusion.finetune.classifier import SpanClassifier, TrainSettings, train_classifier

    before = {k: v.clone() for k, v in enc.module.state_dict().items()}
    settings = TrainSettings(batch_size=3, steps=2, epochs=1, lr=1e-2, head_lr=None, weight_decay=0.0,
                             warmup_share=0.0, max_grad_norm=1.0, seed=0)
    model = SpanClassifier(enc, 1, 2, 0.0)                       # two labels: a loss with a gradient
    history, _ = train_classifier(model, examples, ["y", "z"], settings, torch.device("cpu"))
    after = enc.module.state_dict()
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert not torch.equal(after["pos_embeddings.weight"], before["pos_embeddings.weight"])
    assert torch.equal(after["sentence_embeddings.weight"], before["sentence_embeddings.weight"])


def test_an_artifact_without_the_lexicon_copy_reads_its_options_file(pretrained, tmp_path):
    """Artifacts written before the copy was kept: the options' file, or a clear error without it."""
    import shutil

    from fusion.finetune.encoders import EncoderSource, span_encoder_for
    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.extra_recipes import LEXICON_FILE
    from pipeline import StageFailed

    out, lex, _ = pretrained
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / LEXICON_FILE).unlink(missing_ok=True)
    meta = json.loads((old / "recipe.json").read_text())
    bb = artifact_backbone(old)
    enc = span_encoder_for("sentilr")(EncoderSource("sentilr", old, meta["options"], bb, 32, 32, None, None))
    assert enc.lexicon.valence == PolarityLexicon.from_file(lex).valence
    moved = {**meta["options"], "lexicon_path": str(lex) + ".gone"}
    with pytest.raises(StageFailed, match=r"fusion.finetune: sentilr: cannot load .*lexicon.txt.gone"):
        span_encoder_for("sentilr")(EncoderSource("sentilr", old, moved, bb, 32, 32, None, None))


def test_the_stage_keeps_the_lexicon_it_read_in_the_artifact(pretrained):
    from fusion.pretrain.extra_recipes import LEXICON_FILE

    out, lex, _ = pretrained
    assert (out / LEXICON_FILE).read_bytes() == lex.read_bytes()


def _stage_fingerprint():
    import fusion.pretrain.stage  # noqa: F401 - registers the stage type
    from pipeline.registry import REGISTRY

    return REGISTRY.get("fusion.pretrain").fingerprint


def test_an_edited_lexicon_changes_the_stage_key_and_other_recipes_keep_theirs(tmp_path):
    from fusion.pretrain.stage import PretrainParams

    lex = write_lexicon(tmp_path / "lexicon.txt")
    params = PretrainParams.model_validate({"recipe": "sentilr", "options": {"lexicon_path": str(lex)}})
    before = _stage_fingerprint()(params)
    assert before is not None and _stage_fingerprint()(params) == before
    write_lexicon(lex, {**LEXICON, "fine": 1.0})
    assert _stage_fingerprint()(params) != before
    assert _stage_fingerprint()(PretrainParams.model_validate({"recipe": "mlm"})) is None


def test_the_lexicon_reads_from_any_uri_and_is_fingerprinted(tmp_path, senti_tokenizer):
    """``lexicon_path`` is an input like any other: a ``memory://`` URI reads as the local file does,
    its state (not its name only) is in the fingerprint, and the copy in an artifact is byte-equal."""
    import fsspec

    from fusion.pretrain.extra_recipes import LEXICON_FILE, load_lexicon, pretrained_lexicon

    local = write_lexicon(tmp_path / "lexicon.txt")
    fsspec.filesystem("memory").pipe("/sentilr-test/lexicon.txt", local.read_bytes())
    uri = "memory://sentilr-test/lexicon.txt"
    rec, opts = SentiLrRecipe(), SentiLrOptions(lexicon_path=uri)
    assert SentiLrOptions(lexicon_path="lexicon.txt").lexicon_path == str(Path("lexicon.txt").resolve())
    assert opts.lexicon_path == uri                                            # a URI kept as written
    assert load_lexicon(opts).valence == load_lexicon(SentiLrOptions(lexicon_path=str(local))).valence
    assert rec.resources({}, opts) == {}
    state = rec.encoder({}, opts, senti_tokenizer, 32)
    assert state["kg_counts"] == {"lexicon_entries": len(LEXICON)}
    before = rec.fingerprint(opts)
    assert rec.fingerprint(opts) == before
    fsspec.filesystem("memory").pipe("/sentilr-test/lexicon.txt", local.read_bytes() + b"nice\t2.0\r\n")
    assert rec.fingerprint(opts) != before                                     # an edited lexicon re-runs
    local_print = rec.fingerprint(SentiLrOptions(lexicon_path=str(local)))
    write_lexicon(local, {**LEXICON, "good": -1.0})
    assert rec.fingerprint(SentiLrOptions(lexicon_path=str(local))) != local_print
    out = tmp_path / "artifact"
    out.mkdir()
    rec.save_files({}, opts, out)
    assert (out / LEXICON_FILE).read_bytes() == fsspec.filesystem("memory").cat("/sentilr-test/lexicon.txt")
    gone = SentiLrOptions(lexicon_path=str(tmp_path / "gone.txt"))
    assert pretrained_lexicon(out, gone).score("nice") == 2.0                  # the copy, not the path
    from pipeline import StageFailed

    with pytest.raises(StageFailed, match="memory://sentilr-test/none.txt: no such file"):
        rec.resources({}, SentiLrOptions(lexicon_path="memory://sentilr-test/none.txt"))


def test_a_missing_lexicon_is_a_clear_error(tmp_path):
    from fusion.pretrain.extra_recipes import load_lexicon
    from pipeline import StageFailed

    with pytest.raises(StageFailed, match="nothing.txt"):
        load_lexicon(SentiLrOptions(lexicon_path=str(tmp_path / "nothing.txt")))
