"""SpeechBERT (fusion/models/speechbert.py, fusion/pretrain/speech_recipes.py): segment pooling and the
audio embedding against naive re-implementations, masked acoustic modelling and MLM against naive
formulas, masking rates, shapes and padding, the backbone start, the spoken cloze on a hand-made
case, and one short pretraining through ``fusion.pretrain`` scored by ``fusion.retrieval`` and the
cloze."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion.models.objectives import IGNORE
from fusion.models.single_stream import SingleStream
from fusion.models.speechbert import SpeechBert, SpeechBertConfig, segment_pool, speechbert_backbone
from fusion.pretrain.speech_recipes import SpeechBertRecipe, cloze_queries, spoken_cloze, word_hits

from .conftest import MEDIA_RUN, run_pretrain
from .cuda_checks import check_dropout_step_on_cuda, check_on_cuda, needs_cuda

SIZES = dict(vocab_size=100, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2,
             visual_feat_dim=16, max_position=64, mask_token_id=4, dropout=0.0, attention_dropout=0.0)


def tiny(**config) -> SpeechBert:
    torch.manual_seed(0)
    return SpeechBert(SpeechBertConfig(**(SIZES | {"segment_frames": 3} | config)))


def clips(B: int = 4, L: int = 7, R: int = 11, feat: int = 16, seed: int = 0) -> dict:
    """Text as tests/fusion/test_single_stream.py's; frames with time spans, item 0 padded after 7
    frames, item 2 after 4; frame t spans [t, t + 1.5) / R."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 4:] = 0
    ids[:, 0], ids[attn == 0] = 2, 0
    ids[torch.arange(B), attn.sum(1) - 1] = 3
    special = (ids == 2) | (ids == 3) | (attn == 0)
    t = torch.arange(R, dtype=torch.float32)
    span = torch.stack([t / R, torch.zeros(R), (t + 1.5).clamp(max=R) / R, torch.ones(R)], -1)
    rm = torch.ones(B, R, dtype=torch.bool)
    rm[0, 7:] = rm[2, 4:] = False
    return {"input_ids": ids, "attention_mask": attn, "special_tokens_mask": special.long(),
            "features": torch.randn(B, R, feat, generator=g).half(), "boxes": span.expand(B, R, 4).clone(),
            "region_mask": rm}


def naive_segments(f, boxes, rm, k, global_token):
    """One item and one segment at a time, in float64."""
    B, R, _ = f.shape
    out_f, out_b, out_m = [], [], []
    for i in range(B):
        fi, bi, mi = f[i].double(), boxes[i].double(), rm[i]
        head = [(fi[0], bi[0], bool(mi[0]))] if global_token else []
        start = 1 if global_token else 0
        segs = []
        for j in range(start, R, k):
            real = [t for t in range(j, min(j + k, R)) if mi[t]]
            if real:
                segs.append((torch.stack([fi[t] for t in real]).mean(0),
                             torch.tensor([min(bi[t, 0] for t in real), 0, max(bi[t, 2] for t in real), 1],
                                          dtype=torch.double), True))
            else:
                segs.append((torch.zeros(f.shape[2], dtype=torch.double), torch.zeros(4, dtype=torch.double),
                             False))
        rows = head + segs
        out_f.append(torch.stack([r[0] for r in rows]))
        out_b.append(torch.stack([r[1] for r in rows]))
        out_m.append(torch.tensor([r[2] for r in rows]))
    return torch.stack(out_f), torch.stack(out_b), torch.stack(out_m)


# ------------------------------------------------------------------------------ segments and embedding


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("global_token", [False, True])
def test_segment_pool_against_naive(k, global_token):
    b = clips()
    if global_token:   # float32 frames after a global token: a strided view of the batch
        b["features"] = b["features"].float()
    f, bx, m = segment_pool(b["features"], b["boxes"], b["region_mask"], k, global_token)
    wf, wb, wm = naive_segments(b["features"].float(), b["boxes"], b["region_mask"], k, global_token)
    S = math.ceil((11 - global_token) / k) + global_token
    assert f.shape == (4, S, 16) and bx.shape == (4, S, 4) and m.shape == (4, S)
    assert torch.equal(m, wm)
    torch.testing.assert_close(f.double(), wf, atol=1e-6, rtol=0)
    torch.testing.assert_close(bx.double(), wb, atol=1e-6, rtol=0)
    if k == 1 and not global_token:   # one frame per segment: the frames themselves
        torch.testing.assert_close(f[m], b["features"].float()[b["region_mask"]])


@torch.no_grad()
def test_audio_embedding_and_forward_equations():
    """e_j = LN(W_a s_j + b_a + pos(j) + seg(1)) with the text's tables; forward(frames) is the single
    stream over [LN(word + pos + seg(0)) ; e] of the pooled frames."""
    model = tiny(global_token=True).eval()
    b = clips()
    s = model.segments(b)
    e, W = model.embeddings, model.regions.feat
    S = s["features"].shape[1]
    want = F.layer_norm(s["features"] @ W.weight.T + W.bias + e.position.weight[:S] + e.token_type.weight[1],
                        (32,), e.norm.weight, e.norm.bias, 1e-12)
    got = model.embed_media(s["features"], s["boxes"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    text = F.layer_norm(e.word(b["input_ids"]) + e.position.weight[:7] + e.token_type.weight[0], (32,),
                        e.norm.weight, e.norm.bias, 1e-12)
    ref = model.encode(text, b["attention_mask"], want, s["region_mask"])
    out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
    real_t, real_a = b["attention_mask"].bool(), s["region_mask"]
    torch.testing.assert_close(out.text[real_t], ref[:, :7][real_t], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.media[real_a], ref[:, 7:][real_a], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="audio tokens, not frames"):
        model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"],
              masked_regions=b["region_mask"])


@torch.no_grad()
def test_shapes_padding_and_split_scoring():
    model = tiny().eval()
    b = clips()
    out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
    assert out.text.shape == (4, 7, 32) and out.media.shape == (4, 4, 32) and out.pooled.shape == (4, 32)
    t, m = model.encode_text(b), model.encode_media(b)
    assert t.shape == m.shape == (4, 32)
    torch.testing.assert_close(m.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(model.score_states(model.text_states(b), model.media_states(b)),
                               model.match_score(b, b), atol=1e-6, rtol=0)
    # more frame padding, with garbage behind it, changes nothing
    wide = dict(b)
    wide["features"] = torch.cat([b["features"], torch.randn(4, 5, 16).half()], 1)
    wide["boxes"] = torch.cat([b["boxes"], torch.rand(4, 5, 4)], 1)
    wide["region_mask"] = torch.cat([b["region_mask"], torch.zeros(4, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(model.encode_media(wide), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.match_score(wide, wide), model.match_score(b, b), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ objectives and masking


@pytest.mark.parametrize("region_loss", ["smooth_l1", "mse"])
def test_mam_and_mlm_against_naive(region_loss):
    """MAM = mean over the masked audio tokens and feature dims of loss(W_a^T g(h_j) + c, s_j), s_j the
    segment's mean frame; MLM = mean cross-entropy at the masked words; both from one pass over the
    pooled batch with the masks the generator draws (words first, then audio tokens)."""
    model = tiny(itm_weight=0.0, contrastive_weight=0.0, mlm_prob=0.4, region_mask_prob=0.4,
                 region_loss=region_loss).eval()
    b = clips(seed=2)
    losses = model.loss(b, torch.Generator().manual_seed(7))
    assert set(losses) == {"mlm", "region_feat", "total"}
    s = model.segments(b)
    m = model.masked_inputs(s, torch.arange(4), True, torch.Generator().manual_seed(7))
    assert m.masked_regions.any() and (m.mlm_labels != IGNORE).any()
    out = SingleStream.forward(model, m.input_ids, b["attention_mask"], m.features, s["boxes"],
                               s["region_mask"])
    naive, segs = [], naive_segments(b["features"].float(), b["boxes"], b["region_mask"], 3, False)[0]
    for i, j in m.masked_regions.nonzero().tolist():
        target = segs[i, j].float()
        pred = model.regions.feat.weight.T @ model.region_transform(out.media[i, j]) + model.region_feat_bias
        e = pred - target
        naive.append((torch.where(e.abs() < 1, 0.5 * e ** 2, e.abs() - 0.5) if region_loss == "smooth_l1"
                      else e ** 2).mean())
    torch.testing.assert_close(losses["region_feat"], torch.stack(naive).mean(), atol=1e-5, rtol=1e-5)
    logits = model.mlm_head(out.text)
    ce = [-F.log_softmax(logits[i, j], -1)[y] for (i, j), y in
          zip((m.mlm_labels != IGNORE).nonzero().tolist(), m.mlm_labels[m.mlm_labels != IGNORE].tolist())]
    torch.testing.assert_close(losses["mlm"], torch.stack(ce).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["total"], losses["mlm"] + losses["region_feat"])


def test_masking_rates():
    """15% of the real audio tokens (never padding, never the global token), zeroed; 15% of the words."""
    g = torch.Generator().manual_seed(0)
    B, L, R = 300, 10, 40
    lengths = torch.randint(9, R + 1, (B,), generator=g)
    b = {"input_ids": torch.randint(5, 100, (B, L), generator=g),
         "attention_mask": torch.ones(B, L, dtype=torch.long),
         "features": torch.randn(B, R, 16, generator=g).half(), "boxes": torch.rand(B, R, 4, generator=g),
         "region_mask": torch.arange(R)[None] < lengths[:, None]}
    model = tiny(global_token=True, segment_frames=4)
    s = model.segments(b)
    m = model.masked_inputs(s, torch.arange(B), True, torch.Generator().manual_seed(1))
    avail = s["region_mask"].clone()
    avail[:, 0] = False
    n, chosen = int(avail.sum()), int(m.masked_regions.sum())
    assert not (m.masked_regions & ~avail).any()
    assert abs(chosen / n - 0.15) <= 4 * math.sqrt(0.15 * 0.85 / n)
    assert m.features[m.masked_regions].abs().max() == 0
    assert torch.equal(m.features[~m.masked_regions], s["features"][~m.masked_regions])
    words = m.mlm_labels != IGNORE
    assert abs(int(words.sum()) / (B * L) - 0.15) <= 4 * math.sqrt(0.15 * 0.85 / (B * L))


def test_training_reduces_every_loss():
    model = tiny(contrastive_weight=1.0, initializer_range=0.2, mlm_prob=0.5, region_mask_prob=0.5).train()
    b = clips(B=6, seed=4)
    first = model.loss(b, torch.Generator().manual_seed(0))
    assert set(first) == {"mlm", "region_feat", "itm", "contrastive", "total"}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        model.loss(b, torch.Generator().manual_seed(0))["total"].backward()
        opt.step()
    last = model.loss(b, torch.Generator().manual_seed(0))
    for k in first:
        assert first[k] > 0 and last[k] < 0.5 * first[k], (k, first[k], last[k])


@needs_cuda
def test_cuda_outputs_equal_cpu_and_bf16_trains():
    b = clips()

    def outputs(m, x):
        out = m(x["input_ids"], x["attention_mask"], x["features"], x["boxes"], x["region_mask"])
        return {"pooled": out.pooled, "media": m.encode_media(x), "score": m.match_score(x, x)}

    check_on_cuda(tiny(contrastive_weight=1.0), b, outputs)
    check_dropout_step_on_cuda(tiny(dropout=0.1, attention_dropout=0.1), b)


# ------------------------------------------------------------------------------ backbone start, config


@torch.no_grad()
def test_text_alone_is_the_backbone(backbone, tokenizer):
    model = speechbert_backbone(backbone, visual_feat_dim=16, segment_frames=2, itm_weight=0.0).eval()
    enc = tokenizer(["the red dog in paris", "a cat"], padding=True, return_tensors="pt")
    want = backbone.model.eval()(**enc).last_hidden_state
    got = model.encode(model.embed_text(enc["input_ids"]), enc["attention_mask"], None, None)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    c = model.config
    assert (c.variant, c.segment_frames, c.itm_weight, c.region_feat_weight, c.region_loss) == (
        "speechbert", 2, 0.0, 1.0, "smooth_l1")
    assert c.mask_token_id == tokenizer.mask_token_id and c.hidden_size == 32
    assert model.mlm_head.word_embeddings.weight is model.embeddings.word.weight
    with pytest.raises(ValueError, match="come from the backbone"):
        speechbert_backbone(backbone, visual_feat_dim=16, hidden_size=64)
    with pytest.raises(ValueError, match="region_input is fixed"):
        SpeechBertConfig(**SIZES, region_input="uniter")
    with pytest.raises(ValueError, match="segment_frames"):
        SpeechBertConfig(**SIZES, segment_frames=0)
    with pytest.raises(ValueError, match="set by the recipe"):
        SpeechBertRecipe.Options(config={"region_input": "uniter"})
    with pytest.raises(ValueError, match="unknown SpeechBertConfig"):
        SpeechBertRecipe.Options(config={"segment_ms": 300})


# ------------------------------------------------------------------------------ the spoken cloze


def test_cloze_queries(tokenizer):
    texts = ["the red dog", "cats, tim!", "beijing"]
    q = cloze_queries(tokenizer, texts, [0, 1, 2], max_length=8)
    # "the red dog": 3 words; "cats , tim !" -> cat ##s | , | tim | ! (2 without letters);
    # "beijing" is one piece
    assert q.words == ["the", "red", "dog", "cats", "tim", "beijing"]
    assert q.counts["words_without_letters"] == 2 and q.counts["queries"] == 6 and q.counts["texts"] == 3
    vocab = tokenizer.get_vocab()
    k = q.words.index("cats")
    assert q.positions[k] == [1, 2] and q.targets[k] == [vocab["cat"], vocab["##s"]]
    assert q.input_ids[k][1:3] == [tokenizer.mask_token_id] * 2 and q.item[k] == 1
    # "," is not in the tiny vocabulary
    assert q.input_ids[k][0] == tokenizer.cls_token_id and q.input_ids[k][3] == tokenizer.unk_token_id
    cut = cloze_queries(tokenizer, ["the red dog in paris"], [0], max_length=4)   # [CLS] the red [SEP]
    assert cut.words == ["the", "red"] and cut.counts["words_cut_by_max_length"] == 3
    unk = cloze_queries(tokenizer, ["the zebra"], [0], max_length=8)
    assert unk.words == ["the"] and unk.counts["words_unknown_to_tokenizer"] == 1


def test_word_hits_on_hand_made_logits():
    logits = torch.zeros(3, 4, 6)
    logits[0, 1, 5] = logits[0, 2, 2] = 1      # both pieces right
    logits[1, 1, 5] = logits[1, 2, 3] = 1      # one piece of two wrong
    logits[2, 3, 4] = 1                        # one piece, right
    got = word_hits(logits, [[1, 2], [1, 2], [3]], [[5, 2], [5, 2], [4]])
    assert got.tolist() == [True, False, True]


class _Bank:
    """Clips of one frame whose first value is a token id (what the oracle below "hears")."""

    def __init__(self, said: list[int]):
        self.said = said

    def __len__(self) -> int:
        return len(self.said)

    def batch(self, index):
        f = torch.zeros(len(index), 1, 4)
        f[:, 0, 0] = torch.tensor([float(self.said[i]) for i in index])
        return {"features": f, "boxes": torch.zeros(len(index), 1, 4),
                "region_mask": torch.ones(len(index), 1, dtype=torch.bool)}


class _Oracle(torch.nn.Module):
    """At every position, logits peaked at the token id its clip says (id 0 for silence)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.mlm_head = torch.nn.Identity()

    def forward(self, ids, attn, features, boxes, region_mask):
        said = features[:, 0, 0].round().long()                                  # (B,)
        logits = F.one_hot(said, self.vocab).float()[:, None].expand(-1, ids.shape[1], -1)
        return type("Out", (), {"text": logits})()


def test_spoken_cloze_on_a_hand_made_case(tokenizer):
    """Three one-word transcripts whose clips "say" their word, one of two pieces ("dogs"): with its own
    audio the oracle fills the one-piece words (2 of 3: one id everywhere cannot be both pieces), with
    zeros nothing, with the next clip's audio nothing."""
    vocab = tokenizer.get_vocab()
    texts = ["dog", "cat", "dogs"]
    bank = _Bank([vocab["dog"], vocab["cat"], vocab["dog"]])
    r = spoken_cloze(_Oracle(len(vocab)), tokenizer, bank, texts, [0, 1, 2], max_length=8, batch_size=2)
    assert r["queries"] == 3
    assert r["accuracy_audio"] == pytest.approx(2 / 3) and r["accuracy_zeros"] == 0
    assert r["accuracy_other"] == 0 and r["audio_gain"] == pytest.approx(2 / 3)
    assert [w["audio"] for w in r["per_word"]] == [True, True, False]
    # a text alone model (here: the clip ignored, "dog" always) scores alike in every mode
    bank_same = _Bank([vocab["dog"]] * 3)
    same = spoken_cloze(_Oracle(len(vocab)), tokenizer, bank_same, texts, [0, 1, 2], max_length=8)
    assert same["accuracy_audio"] == same["accuracy_other"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown audio mode"):
        spoken_cloze(_Oracle(len(vocab)), tokenizer, bank, texts, [0, 1, 2], 8, modes=("silence",))


# ------------------------------------------------------------------------------ through the stage


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, feature_artifact, backbone_dir) -> tuple[dict, Path]:
    return run_pretrain(tmp_path_factory.mktemp("speechbert"), "speechbert", {"media": feature_artifact},
                        MEDIA_RUN | {"backbone": str(backbone_dir), "recipe": "speechbert", "steps": 40,
                                     "options": {"held_out_share": 0.25,
                                                 "config": {"initializer_range": 0.2, "segment_frames": 2,
                                                            "region_mask_prob": 0.5}}})


def test_recipe_trains_loads_back_and_scores(trained, feature_artifact, tmp_path):
    """40 steps on the synthetic artifact (regions stand in for frames: a global token, then 3 "frames"
    pooled two at a time): every objective reported, the losses fall, the model comes back as a
    SpeechBert, fusion.retrieval scores it (dual above chance; all pairs == rerank of every item), and
    the cloze asks every held-out word in each mode."""
    from fusion.pretrain.loop import load_pretrained
    from fusion.pretrain.speech_recipes import evaluate_cloze
    from fusion.retrieval.stage import RetrievalParams, evaluate

    metrics, out = trained
    for k in ("mlm", "region_feat", "itm", "contrastive"):
        assert f"loss_{k}_first" in metrics, metrics
    # one step is noisy (a few masked tokens): the means of the first and the last 10 steps
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 40
    for k in ("mlm", "region_feat", "contrastive", "total"):
        first, last = (sum(h[f"loss_{k}"] for h in rows) / 10 for rows in (history[:10], history[-10:]))
        assert last < first, (k, first, last)
    _, _, _, model, meta = load_pretrained(out)
    assert isinstance(model, SpeechBert) and meta["recipe"] == "speechbert" and not model.training
    assert model.config.segment_frames == 2 and model.config.global_token

    def score(mode: str, **params):
        return evaluate(out, feature_artifact, tmp_path / mode,
                        RetrievalParams(mode=mode, split="all", **params))

    full, re = score("all_pairs"), score("rerank", k=42)
    keys = [k for k in full if "R@" in k or "rank" in k]
    assert keys and {k: full[k] for k in keys} == pytest.approx({k: re[k] for k in keys})
    dual = score("dual")
    chance5 = 100 * 5 / 42
    assert dual["text_to_media_R@1"] > chance5 and dual["media_to_text_R@1"] > chance5, dual
    cloze = evaluate_cloze(out, feature_artifact, split="test")
    # held-out captions "the <colour> <noun>": three words each, all in the vocabulary
    assert cloze["queries"] == 3 * cloze["test_texts"] > 0 and cloze["modes"] == ["audio", "zeros", "other"]
    assert all(0 <= cloze[f"accuracy_{m}"] <= 1 for m in cloze["modes"])
    assert cloze["audio_gain"] == pytest.approx(cloze["accuracy_audio"] - cloze["accuracy_zeros"])
