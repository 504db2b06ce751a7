"""VideoBERT (fusion/models/videobert.py): hierarchical k-means against a naive implementation, the
visual-word sequence, each loss against a naive re-implementation of its equation, masking rates,
the bounded frame sample, and a short pretraining through ``fusion.pretrain`` scored by
``fusion.retrieval`` (feature artifacts of ``make_feature_artifact`` stand in for videos: regions
are the frames)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion.models.objectives import IGNORE, itm_pairs, mlm_mask
from fusion.models.videobert import (VideoBert, VideoBertConfig, fit_hierarchical_kmeans, hierarchical_assign,
                                     videobert_backbone)
from fusion.pretrain.video_recipes import sample_frames

from .conftest import MEDIA_RUN, make_feature_artifact, run_pretrain, text_media_batch
from .cuda_checks import check_dropout_step_on_cuda, check_on_cuda, needs_cuda

V, FEAT = 100, 16
SIZES = dict(vocab_size=V, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2,
             visual_feat_dim=FEAT, max_position=64, mask_token_id=4, sep_token_id=3, dropout=0.0,
             attention_dropout=0.0, kmeans_depth=2, kmeans_branching=3)


def se_bound(count: int, n: int, p: float, k: float = 4.0) -> bool:
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


def tiny(**config) -> VideoBert:
    torch.manual_seed(0)
    model = VideoBert(VideoBertConfig(**(SIZES | config)))
    x = torch.randn(300, FEAT, generator=torch.Generator().manual_seed(9))
    model.set_codebook(fit_hierarchical_kmeans(x, model.config.kmeans_depth, model.config.kmeans_branching))
    return model


def inputs(B: int = 4, L: int = 7, R: int = 5, seed: int = 0) -> dict:
    """Padded text (items 1, 2), padded frames (item 0), [CLS] ... [SEP] special tokens."""
    return text_media_batch(B, L, R, FEAT, V, seed)


# ------------------------------------------------------------------------ hierarchical k-means


def naive_tree(points: list[list[float]], depth: int, b: int, iterations: int, seed: int
               ) -> tuple[list[list[list[float]]], list[int]]:
    """The module docstring's procedure with plain Python loops: ``(levels, leaf of each point)``."""
    def dist(p, c):
        return sum((pi - ci) ** 2 for pi, ci in zip(p, c))

    def nearest(p, cents):
        d = [dist(p, c) for c in cents]
        return d.index(min(d))                                    # ties: the first

    dim = len(points[0])
    levels: list[list[list[float]]] = []
    groups = [list(range(len(points)))]
    parents = [[sum(points[i][k] for i in groups[0]) / len(points) for k in range(dim)]]
    for level in range(depth):
        cents_level, next_groups = [], []
        for node, (idx, parent) in enumerate(zip(groups, parents)):
            if not idx:
                cents_level += [list(parent) for _ in range(b)]
                next_groups += [[] for _ in range(b)]
                continue
            state = np.random.SeedSequence([seed, level, node]).generate_state(1)[0]
            g = torch.Generator().manual_seed(int(state))
            pick = (torch.randperm(len(idx), generator=g)[:b].tolist() if len(idx) >= b
                    else [j % len(idx) for j in range(b)])
            cents = [list(points[idx[j]]) for j in pick]
            assign = [nearest(points[i], cents) for i in idx]
            for _ in range(iterations):
                for j in range(b):
                    members = [points[i] for i, a in zip(idx, assign) if a == j]
                    if members:
                        cents[j] = [sum(m[k] for m in members) / len(members) for k in range(dim)]
                new = [nearest(points[i], cents) for i in idx]
                if new == assign:
                    break
                assign = new
            cents_level += cents
            next_groups += [[i for i, a in zip(idx, assign) if a == j] for j in range(b)]
        levels.append(cents_level)
        groups, parents = next_groups, cents_level
    leaf = [0] * len(points)
    for n, idx in enumerate(groups):
        for i in idx:
            leaf[i] = n
    return levels, leaf


@pytest.mark.parametrize("n, depth, b", [(90, 2, 3), (14, 3, 3)])   # the second has tiny and empty nodes
def test_hierarchical_kmeans_against_naive(n, depth, b):
    g = torch.Generator().manual_seed(n)
    centres = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    x = centres[torch.arange(n) % 4] + torch.randn(n, 5, generator=g, dtype=torch.float64)
    levels = fit_hierarchical_kmeans(x, depth, b, iterations=15, seed=3)
    want_levels, want_leaf = naive_tree(x.tolist(), depth, b, 15, 3)
    assert [tuple(c.shape) for c in levels] == [(b ** (k + 1), 5) for k in range(depth)]
    for got, want in zip(levels, want_levels):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)
    words = hierarchical_assign(x, levels, b)           # the descent gives the fit's own partition
    assert words.tolist() == want_leaf
    assert int(words.max()) < b ** depth and len(set(want_leaf)) > b
    # chunked descent equals unchunked; another seed draws another tree
    assert hierarchical_assign(x, levels, b, chunk=4).tolist() == want_leaf
    other = fit_hierarchical_kmeans(x, depth, b, iterations=15, seed=4)
    assert any(not torch.equal(a, o) for a, o in zip(levels, other))


def test_kmeans_refuses_nothing_to_fit():
    with pytest.raises(ValueError, match="at least one"):
        fit_hierarchical_kmeans(torch.zeros(0, 3), 2, 2)


# ------------------------------------------------------------------------ the sequence


def test_visual_words_sequence_and_codebook_checks():
    model = tiny(global_token=True).eval()
    b = inputs()
    words, mask = model.visual_words(b["features"], b["region_mask"])
    frames = b["features"][:, 1:].float()                                   # region 0: global token
    want = hierarchical_assign(frames.reshape(-1, FEAT), model.codebook, 3).view(4, 4)
    assert torch.equal(mask, b["region_mask"][:, 1:])
    assert torch.equal(words[mask], want[mask]) and (words[~mask] == 0).all()
    ids, vmask = model.video_ids(words, mask)
    assert ids.shape == (4, 5) and vmask.tolist()[0] == [True, True, True, False, False]
    assert ids[0, :2].tolist() == (V + want[0, :2]).tolist() and ids[0, 2] == 3   # [SEP] after the frames
    assert (ids[1:, 4] == 3).all() and ((ids[vmask & (ids != 3)] >= V).all())
    out = model(b["input_ids"], b["attention_mask"], b["features"], b["region_mask"])
    assert out.text.shape == (4, 7, 32) and out.video.shape == (4, 5, 32) and out.pooled.shape == (4, 32)
    # the split score (what fusion.retrieval caches) is the pair's alignment logit
    with torch.no_grad():
        full = model.match_score(b, b)
        split = model.score_states(model.text_states(b), model.media_states(b))
    torch.testing.assert_close(split, full)
    for v in (model.encode_text(b), model.encode_media(b)):
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    fresh = VideoBert(VideoBertConfig(**SIZES))
    with pytest.raises(RuntimeError, match="no codebook"):
        fresh.visual_words(b["features"])
    with pytest.raises(ValueError, match="do not fit"):
        fresh.set_codebook([torch.zeros(3, FEAT)])
    with pytest.raises(ValueError, match="exceed"):
        VideoBert(VideoBertConfig(**(SIZES | {"max_position": 10}))).encode(b["input_ids"], None,
                                                                             ids, vmask)


def naive_item(model: VideoBert, text: list[int], video: list[int]) -> torch.Tensor:
    """One item's outputs (S, D) of ``[text ; video]`` without padding: positions 0..S-1, segments
    0 then 1, LN(E + P + S), the layers without a mask."""
    e = model.embeddings
    ids = torch.tensor(text + video)
    seg = torch.tensor([0] * len(text) + [1] * len(video))
    x = e.norm(e.word(ids) + e.position.weight[:len(ids)] + e.token_type(seg))[None]
    for layer in model.layers:
        x = layer(x)
    return x[0]


def test_losses_against_naive():
    """L_text and L_video = mean cross-entropy of softmax(MLM(h)) over the joint vocabulary at the
    labelled positions of aligned pairs; L_align = BCE of w^T tanh(W h_[CLS] + b) + c."""
    model = tiny(global_token=True, contrastive_weight=0.0, mlm_prob=0.5, visual_mask_prob=0.5,
                 initializer_range=0.3).eval()
    b = inputs(B=6)
    b["region_mask"][3, 2:] = False
    seed = 11
    losses = model.loss(b, torch.Generator().manual_seed(seed))
    # the same draws in the loss's order: pairs, text masking, video masking
    g = torch.Generator().manual_seed(seed)
    text_index, aligned = itm_pairs(6, g, 0.5)
    maskable = b["attention_mask"][text_index].bool() & ~b["special_tokens_mask"][text_index].bool()
    t_ids, t_lab = mlm_mask(b["input_ids"][text_index], maskable, 4, V, g, 0.5)
    v_ids, v_mask = model.video_ids(*model.visual_words(b["features"], b["region_mask"]))
    v_ids, v_lab = model.mask_video(v_ids, v_mask, g)
    assert (~aligned).any() and (t_lab[aligned] != IGNORE).any() and (v_lab[aligned] != IGNORE).any()
    head = model.mlm_head
    text_ce, video_ce, logits = [], [], []
    for i in range(6):
        n, T = int(b["attention_mask"][text_index[i]].sum()), int(v_mask[i].sum())
        h = naive_item(model, t_ids[i, :n].tolist(), v_ids[i, :T].tolist())
        pred = F.log_softmax(F.layer_norm(F.gelu(h @ head.dense.weight.T + head.dense.bias), (32,),
                                          head.norm.weight, head.norm.bias, 1e-12)
                             @ model.embeddings.word.weight.T + head.bias, -1)   # (S, V + K)
        assert pred.shape[1] == V + 9
        if aligned[i]:
            text_ce += [-pred[j, y] for j, y in enumerate(t_lab[i, :n].tolist()) if y != IGNORE]
            video_ce += [-pred[n + j, y] for j, y in enumerate(v_lab[i, :T].tolist()) if y != IGNORE]
        logits.append(model.align.weight[0] @ torch.tanh(model.pooler.weight @ h[0] + model.pooler.bias)
                      + model.align.bias[0])
    torch.testing.assert_close(losses["mlm"], torch.stack(text_ce).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["visual"], torch.stack(video_ce).mean(), atol=1e-5, rtol=1e-5)
    p = torch.sigmoid(torch.stack(logits))
    y = aligned.float()
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(losses["align"], bce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["total"], losses["mlm"] + losses["visual"] + losses["align"])
    assert set(losses) == {"mlm", "visual", "align", "total"}


def test_video_masking_rates():
    """15% of the real visual words (never the closing [SEP] or padding); of those 80% [MASK], 10%
    a random *visual* word, 10% kept; the labels are the original joint ids."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    B, T = 300, 20
    words = torch.randint(9, (B, T), generator=g)
    mask = torch.arange(T) < torch.randint(5, T + 1, (B, 1), generator=g)
    ids, vmask = model.video_ids(words, mask)
    out, labels = model.mask_video(ids, vmask, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE
    frames = vmask & (ids != 3)
    assert not (chosen & ~frames).any() and se_bound(int(chosen.sum()), int(frames.sum()), 0.15)
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(out[~chosen], ids[~chosen])
    n = int(chosen.sum())
    masked, other = out[chosen] == 4, out[chosen] != 4
    assert se_bound(int(masked.sum()), n, 0.8)
    assert ((out[chosen][other] >= V) & (out[chosen][other] < V + 9)).all()     # a visual word
    changed = other & (out[chosen] != ids[chosen])
    assert se_bound(int(changed.sum()), n, 0.1 * 8 / 9)    # random draws can hit the same word


def test_sample_frames_is_bounded_seeded_and_of_training_items(tmp_path):
    art = make_feature_artifact(tmp_path / "v", dim=FEAT, global_token=True)
    keep = {"red-dog", "blue-cat", "green-art"}
    x, counts = sample_frames(str(art), keep, 100, 0, True, None)
    assert x.shape == (9, FEAT) and counts["kmeans_items"] == 3      # 3 frames each, global token out
    capped, _ = sample_frames(str(art), keep, 4, 0, True, None)
    assert capped.shape == (4, FEAT)
    cut, _ = sample_frames(str(art), keep, 100, 0, True, 2)          # max_regions counts the token
    assert cut.shape == (3, FEAT)
    from fusion.pairs import MediaBank

    bank = MediaBank.load(art, ["red-dog"])
    assert any(np.allclose(x[k:k + 3], bank.features[1:4].astype(np.float32)) for k in range(0, 9, 3))



def test_sample_frames_draws_row_groups_by_seed_and_passes_on_a_short_shard_s_share(tmp_path):
    """The seed picks which row groups (not just which shard comes first) give frames; a shard with
    fewer training frames than its share gives them all and leaves the rest to the other shards."""
    import pyarrow.parquet as pq

    art = make_feature_artifact(tmp_path / "v", dim=FEAT, global_token=True)   # 42 items, 3 frames each
    (shard,) = sorted((art / "features").glob("*.parquet"))
    whole = pq.read_table(shard)
    shard.unlink()
    pq.write_table(whole.slice(0, 38), art / "features" / "part-00000.parquet", row_group_size=4)
    pq.write_table(whole.slice(38), art / "features" / "part-00001.parquet")    # 4 items: 12 frames
    keep = set(whole["id"].to_pylist())
    draws = {}
    for seed in range(6):
        x, counts = sample_frames(str(art), keep, 30, seed, True, None)
        assert x.shape == (30, FEAT) and counts["kmeans_shards"] == 2       # 12 (all it has) + 18
        again, _ = sample_frames(str(art), keep, 30, seed, True, None)
        np.testing.assert_array_equal(x, again)
        draws[seed] = x.tobytes()
    assert len(set(draws.values())) > 2      # the seeds draw different frames, not one prefix


def test_sample_frames_reads_no_row_past_a_shard_s_quota(tmp_path, monkeypatch):
    """Rows are pulled one batch at a time and the reading stops at the row that fills the quota:
    a cap of 4 frames (3 per item) reads two one-row batches, not a third."""
    import pyarrow.parquet as pq

    art = make_feature_artifact(tmp_path / "v", dim=FEAT, global_token=True)
    keep = set(pq.read_table(art / "items.parquet", columns=["id"])["id"].to_pylist())
    pulled = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **k):
        for rb in real(self, *a, **k):
            pulled.append(rb.num_rows)
            yield rb

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    x, counts = sample_frames(str(art), keep, 4, 0, True, None, batch_rows=1)
    assert x.shape == (4, FEAT) and counts["kmeans_items"] == 2 and pulled == [1, 1]


def test_text_alone_is_the_backbone(backbone, tokenizer):
    """The joint table's first V rows and the layers are the backbone's: the caption alone gives the
    backbone's own outputs; the K visual rows are new."""
    model = videobert_backbone(backbone, visual_feat_dim=FEAT).eval()
    backbone.model.eval()
    n = len(tokenizer)
    assert model.config.vocab_size == n and model.embeddings.word.num_embeddings == n + 64   # 8^2 words
    assert (model.config.sep_token_id, model.config.mask_token_id) == (tokenizer.sep_token_id,
                                                                        tokenizer.mask_token_id)
    enc = tokenizer(["the red dog", "paris is a city in france"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = backbone.model(**enc).last_hidden_state
        got = model.encode(enc["input_ids"], enc["attention_mask"], None, None)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="come from the backbone"):
        videobert_backbone(backbone, hidden_size=64)

@needs_cuda
def test_cuda_outputs_equal_cpu_and_bf16_trains():
    b = inputs()
    check_on_cuda(tiny(global_token=True, contrastive_weight=1.0), b,
                  lambda m, x: {"pooled": m(x["input_ids"], x["attention_mask"], x["features"],
                                            x["region_mask"]).pooled,
                                "score": m.match_score(x, x), "media": m.encode_media(x)})
    check_dropout_step_on_cuda(tiny(dropout=0.1, attention_dropout=0.1, contrastive_weight=1.0), b)


# ------------------------------------------------------------------------ through the stage


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, feature_artifact, backbone_dir) -> tuple[dict, Path]:
    return run_pretrain(tmp_path_factory.mktemp("videobert"), "videobert", {"media": feature_artifact},
                        MEDIA_RUN | {"backbone": str(backbone_dir), "recipe": "videobert", "steps": 40,
                                     "options": {"held_out_share": 0.25, "kmeans_depth": 2,
                                                 "kmeans_branching": 3,
                                                 # more masked frames per batch than 15%: a steadier
                                                 # loss to judge
                                                 "config": {"initializer_range": 0.2,
                                                            "visual_mask_prob": 0.4}}})


def mean(history: list[dict], key: str, rows: slice) -> float:
    return sum(h[key] for h in history[rows]) / len(history[rows])


def test_recipe_trains_keeps_its_codebook_and_scores(trained, feature_artifact, tmp_path):
    from fusion.pairs import load_pairs
    from fusion.pretrain.loop import load_pretrained
    from fusion.pretrain.media_recipes import MediaOptions, train_items
    from fusion.retrieval.stage import RetrievalParams, evaluate

    metrics, out = trained
    for k in ("mlm", "visual", "align", "contrastive", "total"):
        assert f"loss_{k}_first" in metrics, metrics
    hist = json.loads((out / "history.json").read_text())
    for k in ("loss_total", "loss_mlm", "loss_visual", "loss_contrastive"):
        assert mean(hist, k, slice(-10, None)) < mean(hist, k, slice(0, 10)), k
    n_train = len(train_items(str(feature_artifact), MediaOptions(held_out_share=0.25))[0])
    assert metrics["visual_words"] == 9 and metrics["kmeans_frames"] == 3 * n_train
    _, _, backbone, model, meta = load_pretrained(out)
    assert meta["recipe"] == "videobert" and "codebook" not in meta["resources_meta"]
    # the model read back tokenises with the codebook fitted from the training frames
    chosen = set(train_items(str(feature_artifact), MediaOptions(held_out_share=0.25))[0])
    x, _ = sample_frames(str(feature_artifact), chosen, 20000, 0, True, None)
    want = fit_hierarchical_kmeans(torch.from_numpy(x), 2, 3, 20, 0)
    assert bool(model.codebook_fitted)
    for got, w in zip(model.codebook, want):
        torch.testing.assert_close(got, w)
    bank, caps, _ = load_pairs(feature_artifact, "all")

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
