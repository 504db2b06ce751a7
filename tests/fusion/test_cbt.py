"""CBT (fusion/models/cbt.py): the masked-frame NCE and the cross-modal NCE against naive
re-implementations of the paper's equations, frame masking rates, shapes and the split score, and a
short pretraining through ``fusion.pretrain`` scored by ``fusion.retrieval`` (a feature artifact of
``make_feature_artifact`` stands in for videos: regions are the frames)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fusion.pretrain.video_recipes  # noqa: F401  (registers the cbt recipe)
from fusion.models.cbt import CBT, CBTConfig, cbt_backbone, cross_nce, visual_nce
from fusion.models.objectives import IGNORE, mlm_mask

from .conftest import MEDIA_RUN, run_pretrain, text_media_batch
from .cuda_checks import check_dropout_step_on_cuda, check_on_cuda, needs_cuda

V, FEAT = 100, 16
SIZES = dict(vocab_size=V, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2, visual_layers=2,
             cross_layers=1, visual_feat_dim=FEAT, max_position=64, mask_token_id=4, dropout=0.0,
             attention_dropout=0.0)


def se_bound(count: int, n: int, p: float, k: float = 4.0) -> bool:
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


def tiny(**config) -> CBT:
    torch.manual_seed(0)
    return CBT(CBTConfig(**(SIZES | config)))


def inputs(B: int = 4, L: int = 7, R: int = 5, seed: int = 0) -> dict:
    """Padded text (items 1, 2), padded frames (item 0), [CLS] ... [SEP] special tokens."""
    return text_media_batch(B, L, R, FEAT, V, seed)


def naive_text(model: CBT, ids: list[int]) -> torch.Tensor:
    """h^s (L, D) of one unpadded text."""
    x = model.embeddings(torch.tensor(ids)[None])
    for layer in model.layers:
        x = layer(x)
    return x[0]


def naive_video(model: CBT, frames: torch.Tensor) -> torch.Tensor:
    """h^v (T, D) of one unpadded clip (T, F): LN(W_e x_t + b_e + P_v[t]), the visual layers."""
    x = model.frame_norm(frames @ model.frame.weight.T + model.frame.bias
                         + model.frame_position.weight[:len(frames)])[None]
    for layer in model.visual_layers:
        x = layer(x)
    return x[0]


def naive_mi(model: CBT, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """log MI(s, v) of one unpadded pair: the MLP on z_0 of the cross-modal transformer."""
    z = torch.cat([text + model.modality.weight[0], video + model.modality.weight[1]])[None]
    for layer in model.cross_layers:
        z = layer(z)
    lin1, act, lin2 = model.mi
    return (lin2.weight @ act(lin1.weight @ z[0, 0] + lin1.bias) + lin2.bias)[0]


def test_visual_nce_against_naive():
    """L_visual = -mean_t log sum_{j: x_j = x_t} exp(e_j . yhat_t) / sum_{j real frames of the batch}
    exp(e_j . yhat_t), e_j = W_e x_j + b_e of the original features, yhat_t = W_p h^v_t of the masked
    clip: a frame repeated in the batch counts as the positive in every copy."""
    model = tiny(global_token=True, cross_weight=0.0, frame_mask_prob=0.4, initializer_range=0.3).eval()
    b = inputs(B=5)
    b["region_mask"][3, 3:] = False
    # repeated frames (a slow source sampled faster; one frame in two clips): every copy is positive
    b["features"][1, 2] = b["features"][1, 1]
    b["features"][2, 1] = b["features"][0, 2]
    b["features"][4, 4] = b["features"][4, 3]
    losses = model.loss(b, torch.Generator().manual_seed(4))
    assert set(losses) == {"visual", "total"}
    frames, fmask = b["features"][:, 1:].float(), b["region_mask"][:, 1:]       # global token out
    # the loss's one draw: each real frame with probability 0.4
    chosen = (torch.rand(fmask.shape, generator=torch.Generator().manual_seed(4)) < 0.4) & fmask
    assert chosen.sum() >= 2
    real = [frames[i, t] for i in range(5) for t in range(4) if fmask[i, t]]
    embeds = [x @ model.frame.weight.T + model.frame.bias for x in real]
    terms = []
    for i in range(5):
        T = int(fmask[i].sum())
        h = naive_video(model, frames[i, :T].masked_fill(chosen[i, :T, None], 0))
        for t in range(T):
            if chosen[i, t]:
                yhat = model.frame_pred.weight @ h[t] + model.frame_pred.bias
                num = sum(torch.exp(e @ yhat) for x, e in zip(real, embeds) if torch.equal(x, frames[i, t]))
                terms.append(-torch.log(num / sum(torch.exp(e @ yhat) for e in embeds)))
    torch.testing.assert_close(losses["visual"], torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    # nothing masked: a zero loss that keeps the graph
    zero = visual_nce(torch.zeros(0, 3, requires_grad=True), torch.ones(4, 3, requires_grad=True),
                      torch.zeros(0, dtype=torch.long))
    assert zero.item() == 0 and zero.requires_grad


def test_cross_nce_against_naive():
    """L_cross = -mean_v log MI(s_v, v) / sum_{s' in the batch} MI(s', v), MI = exp(MLP(z_0)), every
    pair scored by its own unpadded cross-modal pass."""
    model = tiny(visual_weight=0.0, global_token=False, initializer_range=0.3).eval()   # scores far apart
    b = inputs(B=4)
    losses = model.loss(b, torch.Generator().manual_seed(0))
    assert set(losses) == {"cross", "total"}
    texts = [naive_text(model, b["input_ids"][i, :int(b["attention_mask"][i].sum())].tolist())
             for i in range(4)]
    videos = [naive_video(model, b["features"][j, :int(b["region_mask"][j].sum())].float()) for j in range(4)]
    mi = torch.stack([torch.stack([naive_mi(model, texts[i], videos[j]).exp() for j in range(4)])
                      for i in range(4)])                                          # (texts, clips)
    want = torch.stack([-torch.log(mi[j, j] / mi[:, j].sum()) for j in range(4)]).mean()
    torch.testing.assert_close(losses["cross"], want, atol=1e-5, rtol=1e-5)
    # the split score fusion.retrieval caches is the pair's log MI; all_pairs' diagonal is it too
    with torch.no_grad():
        split = model.score_states(model.text_states(b), model.media_states(b))
        t, m = model.text_states(b), model.media_states(b)
        grid = model.all_pairs(t["states"], t["mask"], m["states"], m["mask"])
    torch.testing.assert_close(split, torch.log(torch.diagonal(mi)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, model.match_score(b, b))
    torch.testing.assert_close(grid, mi.log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross_nce(grid), want, atol=1e-5, rtol=1e-5)


def test_mlm_term_and_weights():
    """w_bert L_bert is BERT's MLM on h^s (off by default); total = the weighted sum."""
    model = tiny(mlm_weight=0.5, visual_weight=2.0, cross_weight=0.0, mlm_prob=0.5).eval()
    b = inputs()
    losses = model.loss(b, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    maskable = b["attention_mask"].bool() & ~b["special_tokens_mask"].bool()
    ids, labels = mlm_mask(b["input_ids"], maskable, 4, V, g, 0.5)
    assert (labels != IGNORE).any()
    ce = []
    for i in range(4):
        n = int(b["attention_mask"][i].sum())
        logits = model.mlm_head(naive_text(model, ids[i, :n].tolist()))
        ce += [-torch.log_softmax(logits[j], -1)[y] for j, y in enumerate(labels[i, :n].tolist())
               if y != IGNORE]
    torch.testing.assert_close(losses["mlm"], torch.stack(ce).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["total"], 0.5 * losses["mlm"] + 2.0 * losses["visual"])
    assert CBTConfig().mlm_weight == 0.0


def test_frame_masking_rates_and_shapes():
    model = tiny(global_token=True, contrastive_weight=1.0)
    g = torch.Generator().manual_seed(0)
    B, R = 200, 12
    feats = torch.randn(B, R, FEAT, generator=g).half()
    rm = torch.arange(R) < torch.randint(2, R + 1, (B, 1), generator=g)
    frames, fmask = model.frames(feats, rm)
    assert frames.shape == (B, R - 1, FEAT) and torch.equal(fmask, rm[:, 1:])   # global token out
    masked, chosen = model.mask_frames(frames, fmask, torch.Generator().manual_seed(1))
    assert not (chosen & ~fmask).any() and se_bound(int(chosen.sum()), int(fmask.sum()), 0.15)
    assert masked[chosen].abs().max() == 0 and torch.equal(masked[~chosen], frames[~chosen])
    b = inputs()
    t, m = model.text_states(b), model.media_states(b)
    assert t["states"].shape == (4, 7, 32) and m["states"].shape == (4, 4, 32) and m["mask"].shape == (4, 4)
    for v in (model.encode_text(b), model.encode_media(b)):
        assert v.shape == (4, 32)
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    assert set(model.loss(b, torch.Generator().manual_seed(0))) == {"visual", "cross", "contrastive", "total"}
    with pytest.raises(ValueError, match="max_frames"):
        tiny(max_frames=3).frames(feats, rm)



def test_text_bert_is_the_backbone(backbone, tokenizer):
    model = cbt_backbone(backbone, visual_feat_dim=FEAT).eval()
    backbone.model.eval()
    enc = tokenizer(["the red dog", "paris is a city in france"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = backbone.model(**enc).last_hidden_state
        got = model.text_states(enc)["states"]
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert model.config.mask_token_id == tokenizer.mask_token_id

@needs_cuda
def test_cuda_outputs_equal_cpu_and_bf16_trains():
    b = inputs()
    check_on_cuda(tiny(global_token=True, contrastive_weight=1.0, mlm_weight=1.0), b,
                  lambda m, x: {"score": m.match_score(x, x), "text": m.encode_text(x),
                                "media": m.encode_media(x)})
    check_dropout_step_on_cuda(tiny(dropout=0.1, attention_dropout=0.1, contrastive_weight=1.0), b)


# ------------------------------------------------------------------------ through the stage


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, feature_artifact, backbone_dir) -> tuple[dict, Path]:
    return run_pretrain(tmp_path_factory.mktemp("cbt"), "cbt", {"media": feature_artifact}, MEDIA_RUN | {
        "backbone": str(backbone_dir), "recipe": "cbt", "steps": 40,
        "options": {"held_out_share": 0.25, "config": {"initializer_range": 0.2}}})


def mean(history: list[dict], key: str, rows: slice) -> float:
    return sum(h[key] for h in history[rows]) / len(history[rows])


def test_recipe_trains_loads_back_and_scores(trained, feature_artifact, tmp_path):
    from fusion.pretrain.loop import load_pretrained
    from fusion.retrieval.stage import RetrievalParams, evaluate

    metrics, out = trained
    assert {"loss_visual_first", "loss_cross_first", "loss_contrastive_first"} <= set(metrics)
    assert "loss_mlm_first" not in metrics                                   # w_bert = 0
    hist = json.loads((out / "history.json").read_text())
    # the cross-modal NCE is not judged: on this data it reaches its plateau, log(batch), within these
    # steps and stays there (as the matching heads of test_single_stream do)
    for k in ("loss_total", "loss_visual", "loss_contrastive"):
        assert mean(hist, k, slice(-10, None)) < mean(hist, k, slice(0, 10)), k
    assert all(math.isfinite(h["loss_cross"]) for h in hist)
    _, _, _, model, meta = load_pretrained(out)
    assert meta["recipe"] == "cbt" and isinstance(model, CBT) and not model.training
    assert model.config.global_token and model.config.visual_feat_dim == 16

    def score(mode: str, **params):
        return evaluate(out, feature_artifact, tmp_path / mode,
                        RetrievalParams(mode=mode, split="all", **params))

    full, re = score("all_pairs"), score("rerank", k=42)
    keys = [k for k in full if "R@" in k or "rank" in k]
    assert keys and {k: full[k] for k in keys} == pytest.approx({k: re[k] for k in keys})
    assert full["pairs_scored"] == 42 * 42
    dual = score("dual")
    chance5 = 100 * 5 / 42   # the contrastive first stage has learned (chance R@1 is 1/42)
    assert dual["text_to_media_R@1"] > chance5 and dual["media_to_text_R@1"] > chance5, dual
