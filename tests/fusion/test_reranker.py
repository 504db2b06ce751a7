"""The listwise re-ranker (``fusion.models.reranker``) and its recipe ``rerank``: the pair score and
the group loss against naive re-implementations of their equations, several positives in a group,
the first stage's weights and the optimiser's groups, the recipe's checks of its inputs, and a run
through a pipeline (dual -> its train-split ranking -> re-ranker -> re-ranking the dual's top k) in
which no held-out item ever enters a training group."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import stele
from fusion.models.backbone import load_backbone
from fusion.models.hf_weights import lxmert_backbone
from fusion.models.reranker import STREAMS, ListwiseReranker, RerankerConfig
from fusion.pretrain.rerank_recipe import RerankOptions, RerankRecipe
from pipeline import StageFailed
from pipeline.store import ArtifactStore

from .conftest import make_feature_artifact

DIM = 16
QUIET = {"dropout": 0.0, "attention_dropout": 0.0}


def tiny(backbone, x_layers: int = 1, quiet: bool = True, **config) -> ListwiseReranker:
    enc = lxmert_backbone(backbone, r_layers=1, x_layers=x_layers, visual_feat_dim=DIM, text_pool="mean",
                          global_token=True,
                          **(QUIET if quiet else {"dropout": 0.5, "attention_dropout": 0.5}))
    return ListwiseReranker(enc, RerankerConfig(**config)).eval()


def grouped_batch(tokenizer, G: int, n: int, text_keys: list[int] | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "dog", "cat", "cow", "the", "a"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (3,), generator=g))
             for _ in range(G * n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    R = 3
    mask = torch.ones(G * n, R, dtype=torch.bool)
    mask[1, 2] = False
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "features": torch.randn(G * n, R, DIM, generator=g).half(),
            "boxes": torch.rand(G * n, R, 4, generator=g), "region_mask": mask, "group": n,
            "media_key": torch.arange(G * n),
            "text_key": torch.tensor(text_keys if text_keys is not None else list(range(G * n)))}


def naive_score(model: ListwiseReranker, batch: dict, i: int, j: int) -> torch.Tensor:
    """s(t_i, m_j) = exp(logit_scale) cos(W_t mean(X^L), W_m pool(X^V)), one pair at a time."""
    enc = model.encoder
    t_mask = batch["attention_mask"][i:i + 1]
    m_mask = batch["region_mask"][j:j + 1]
    h_l = enc.text_stream(batch["input_ids"][i:i + 1], t_mask)
    h_v = enc.media_stream(batch["features"][j:j + 1].float(), batch["boxes"][j:j + 1], m_mask)
    x_l, x_v = enc.cross(h_l, t_mask, h_v, m_mask)
    w = t_mask[0].bool()
    t = enc.text_proj(x_l[0, w].mean(0))
    m = enc.media_proj(x_v[0, 0] if enc.config.global_token else x_v[0, m_mask[0]].mean(0))
    return F.cosine_similarity(t, m, dim=0) * enc.logit_scale.exp()


def test_score_is_the_cosine_of_the_cross_encoded_projections(backbone, tokenizer):
    model = tiny(backbone)
    batch = grouped_batch(tokenizer, 1, 3)
    with torch.no_grad():
        t = model.text_states(batch)
        m = model.media_states({k: batch[k] for k in ("features", "boxes", "region_mask")} |
                               {"features": batch["features"].float()})
        got = model.score_states({k: v[[0, 1, 2, 2]] for k, v in t.items()},
                                 {k: v[[0, 1, 0, 1]] for k, v in m.items()})
        want = torch.stack([naive_score(model, batch, i, j) for i, j in ((0, 0), (1, 1), (2, 0), (2, 1))])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def naive_loss(model: ListwiseReranker, batch: dict) -> dict[str, torch.Tensor]:
    n = batch["group"]
    B = batch["input_ids"].shape[0]
    mk, tk = batch["media_key"].tolist(), batch["text_key"].tolist()
    terms = []
    for g in range(B // n):
        idx = list(range(g * n, g * n + n))
        S = torch.stack([torch.stack([naive_score(model, batch, i, j) for j in idx]) for i in idx])
        for a, i in enumerate(idx):
            pos = torch.tensor([mk[i] == mk[j] or tk[i] == tk[j] for j in idx])
            terms.append(-torch.log(S[a].softmax(0)[pos].sum()))
            terms.append(-torch.log(S[:, a].softmax(0)[pos].sum()))
    listwise = torch.stack(terms).mean()
    enc = model.encoder
    t = F.normalize(enc.text_proj(torch.stack([
        enc.text_stream(batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1])[0][
            batch["attention_mask"][i].bool()].mean(0) for i in range(B)])), dim=-1)
    m = F.normalize(enc.media_proj(enc.media_stream(batch["features"].float(), batch["boxes"],
                                                    batch["region_mask"])[:, 0]), dim=-1)
    logits = enc.logit_scale.exp() * t @ m.T
    same = torch.tensor([[mk[i] == mk[j] or tk[i] == tk[j] for j in range(B)] for i in range(B)])
    c = torch.stack([-torch.log(logits[i].softmax(0)[same[i]].sum()) for i in range(B)]
                    + [-torch.log(logits[:, j].softmax(0)[same[:, j]].sum()) for j in range(B)]).mean()
    return {"listwise": listwise, "contrastive": c}


@pytest.mark.parametrize("text_keys", [None, [0, 1, 0, 3, 4, 5, 6, 7]],
                         ids=["distinct", "a repeated caption"])
def test_group_loss_equals_the_naive_formula(backbone, tokenizer, text_keys):
    model = tiny(backbone, listwise_weight=1.0, contrastive_weight=0.5)
    assert model.encoder.config.global_token
    batch = grouped_batch(tokenizer, 2, 4, text_keys)
    with torch.no_grad():
        got = model.loss(batch)
        want = naive_loss(model, batch)
    torch.testing.assert_close(got["listwise"], want["listwise"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["contrastive"], want["contrastive"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["total"], want["listwise"] + 0.5 * want["contrastive"],
                               atol=1e-5, rtol=1e-5)
    if text_keys is not None:  # the repeated caption is a positive of both items: a lower loss
        plain = model.loss(grouped_batch(tokenizer, 2, 4))
        assert not torch.isclose(plain["listwise"], got["listwise"])


def test_a_batch_of_broken_groups_is_refused(backbone, tokenizer):
    batch = grouped_batch(tokenizer, 2, 4)
    with pytest.raises(ValueError, match="not whole groups of 3"):
        tiny(backbone).loss(batch | {"group": 3})


def test_it_starts_from_the_first_stage_and_its_streams_learn_slower(backbone, tokenizer):
    dual = lxmert_backbone(backbone, r_layers=1, x_layers=0, visual_feat_dim=DIM, text_pool="mean",
                          global_token=True)
    with torch.no_grad():
        for p in dual.parameters():
            p.add_(0.5)  # unlike the re-ranker's own initialisation everywhere
    model = tiny(backbone, x_layers=2, stream_lr_scale=0.1)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    copied = model.load_first_stage(dual.state_dict(), "dual")
    after = model.encoder.state_dict()
    assert copied and all(k.startswith(STREAMS) for k in copied)
    shared = {after[k].data_ptr() for k in copied}  # the MLM head's tied word vectors are copied too
    for k, v in after.items():
        if k in copied or v.data_ptr() in shared:
            torch.testing.assert_close(v, dual.state_dict()[k])
        else:  # the cross layers and the heads stay as built
            torch.testing.assert_close(v, before[k])
    assert any(k.startswith("x_layers.") for k in after)
    assert not any(k.startswith("x_layers.") for k in copied)
    fast, slow = model.param_groups(1e-3)
    assert fast["lr"] == 1e-3 and slow["lr"] == pytest.approx(1e-4)
    names = {id(p): n for n, p in model.encoder.named_parameters()}
    assert {names[id(p)] for p in slow["params"]} == {n for n, _ in model.encoder.named_parameters()
                                                      if n.startswith(STREAMS)}
    assert any(names[id(p)].startswith("x_layers.") for p in fast["params"])
    assert len(fast["params"]) + len(slow["params"]) == len(list(model.parameters()))
    small = lxmert_backbone(backbone, r_layers=2, x_layers=0, visual_feat_dim=DIM)
    with pytest.raises(ValueError, match="not a dual encoder of this shape"):
        other = {k: v for k, v in small.state_dict().items() if not k.startswith("r_layers.1")}
        tiny(backbone).load_first_stage(other | {"text_proj.weight": torch.zeros(3, 3)}, "other")


def test_the_group_loss_trains(backbone, tokenizer):
    torch.manual_seed(0)
    model = tiny(backbone).train()
    batch = grouped_batch(tokenizer, 2, 4)
    opt = torch.optim.AdamW(model.param_groups(3e-3))
    first = None
    for _ in range(30):
        loss = model.loss(batch)
        first = float(loss["listwise"]) if first is None else first
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
    assert float(loss["listwise"]) < 0.5 * first, (first, float(loss["listwise"]))


# ------------------------------------------------------------------ the recipe's input checks
def _artifact(folder: Path, manifest: dict, recipe: dict | None = None) -> str:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if recipe is not None:
        (folder / "recipe.json").write_text(json.dumps(recipe))
    return str(folder)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> str:
    return str(make_feature_artifact(tmp_path_factory.mktemp("rerank-media")))


@pytest.mark.parametrize("case, message", [
    ("not dual", "recipe 'lxmert'; the re-ranker starts from a 'dual'"),
    ("other split", "trained on another split"),
    ("test split", "split 'test', not 'train'"),
    ("short top", "top 4 < group 8"),
    ("other model", "it ranked another model than first_stage"),
    ("not retrieval", "it is not a fusion.retrieval run"),
    ("rerank mode", "mode 'rerank', not 'dual'"),
])
def test_inputs_that_cannot_make_training_groups_are_refused(tmp_path, media, case, message):
    options = RerankOptions().model_dump()
    first = {"recipe": "lxmert" if case == "not dual" else "dual",
             "options": options | {"r_layers": 1} | ({"split_seed": 3} if case == "other split" else {})}
    fs = _artifact(tmp_path / "dual", {"key": "dualkey"}, first)
    ranked = {"type": "fusion.pretrain" if case == "not retrieval" else "fusion.retrieval",
              "inputs": {"model": "otherkey" if case == "other model" else "dualkey"},
              "params": {"split": "test" if case == "test split" else "train",
                         "mode": "rerank" if case == "rerank mode" else "dual",
                         "top": 4 if case == "short top" else 16}}
    neg = _artifact(tmp_path / "ranks", ranked)
    with pytest.raises(StageFailed, match=message) as e:
        RerankRecipe().resources({"media": media, "first_stage": fs, "negatives": neg}, RerankOptions())
    phrases = ("not a fusion.retrieval run", "not 'dual'", "not 'train'", "< group", "another model")
    assert sum(p in str(e.value) for p in phrases) <= 1   # this case's problem alone


@pytest.mark.parametrize("share, split, refused", [
    (0.2, "train", None),                                   # the re-ranker's own split
    (0.6, "test", None),                                    # nested: the items it never saw
    (0.6, "train", None),
    (0.2, "test", "split 'test', not 'train'"),             # the same split: 'test' is held out
    (0.05, "train", "items are held out by the re-ranker"), # it trained on held-out items
])
def test_a_first_stage_on_a_nested_split_may_rank_the_items_it_never_saw(tmp_path, media, share, split,
                                                                        refused):
    from fusion.pretrain.media_recipes import train_items

    first = {"recipe": "dual", "options": RerankOptions().model_dump() | {"r_layers": 1,
                                                                         "held_out_share": share}}
    fs = _artifact(tmp_path / "dual", {"key": "dualkey"}, first)
    neg = _artifact(tmp_path / "ranks", {"type": "fusion.retrieval", "inputs": {"model": "dualkey"},
                                         "params": {"split": split, "mode": "dual", "top": 16}})
    inputs = {"media": media, "first_stage": fs, "negatives": neg}
    if refused:
        with pytest.raises(StageFailed, match=refused):
            RerankRecipe().resources(inputs, RerankOptions())
        return
    got = RerankRecipe().resources(inputs, RerankOptions())["first_stage_train_items"]
    ours, _ = train_items(media, RerankOptions())
    theirs, _ = train_items(media, RerankOptions(held_out_share=share))
    assert got == len(theirs) and set(theirs) <= set(ours)
    assert (got < len(ours)) == (share > 0.2)   # 42 items: 0.6 holds out some of ours


# ------------------------------------------------------------------ through a pipeline
PIPELINE = Path(__file__).parents[2] / "pipelines" / "emoji_rerank.yaml"
EMOJI = Path(__file__).parents[2] / "pipelines" / "data" / "emoji"


def test_pipeline_trains_on_train_items_only_and_reranks_the_dual(ray_local, tmp_path, backbone_dir,
                                                                   monkeypatch):
    monkeypatch.setenv("STELE_DATA", str(EMOJI.parent))   # !data emoji: the repository's slice
    tiny_run = {"emoji_images.backbone": "test_efficientnet", "emoji_images.weights": None,
                **{f"{s}.{k}": v for s in ("dual", "reranker", "dual_half", "reranker_cf") for k, v in
                   {"backbone": str(backbone_dir), "steps": 3, "warmup_steps": 0,
                    "checkpoint_every": 3}.items()},
                **{f"{s}.k": 4 for s in ("reranker_eval", "reranker_fused", "reranker_cf_eval",
                                         "reranker_cf_on_dual", "reranker_cf_on_dual_fused")},
                "reranker.batch_size": 2, "reranker.options.group": 4, "dual_train_ranks.top": 6,
                "reranker_cf.batch_size": 2, "reranker_cf.options.group": 4,
                "dual_half_unseen_ranks.top": 6, "dual.batch_size": 8, "dual_half.batch_size": 8}
    run = stele.run(PIPELINE, store=tmp_path / "store", set=tiny_run, quiet=True, report=False)
    assert run.ok, {n: o.error for n, o in run.outcomes.items() if o.error}
    store = ArtifactStore(tmp_path / "store")
    m = run.outcomes["reranker"].metrics
    ranked = pq.read_table(store.open(run.outcomes["dual_train_ranks"].key).path / "ranks.parquet")
    assert {len(t) for t in ranked["top_ids"].to_pylist()} == {6}
    train = {q.split("#")[0] for q in ranked["query_id"].to_pylist()}
    assert m["groups"] == (m["train_items"] - m.get("train_items_without_text", 0)
                           - m.get("anchors_short_of_negatives", 0)) > 0
    assert m.get("negatives_not_train", 0) == 0   # a train-split ranking names training items only
    # every item of every training group is a training item, the anchor first and never repeated
    # (the stage's corpus is gone with its state: the recipe encodes the same inputs again here)
    rec, options = RerankRecipe(), RerankOptions(group=4)
    inputs = {role: str(store.open(run.outcomes[stage].key).path) for role, stage in
              (("media", "emoji_images"), ("first_stage", "dual"), ("negatives", "dual_train_ranks"))}
    state = rec.encoder(inputs, options, load_backbone(str(backbone_dir)).tokenizer, 16)
    groups = [row["media"] for unit in rec.units(inputs, options, None)
              for row in rec.encode(state, inputs, unit)[0]]
    assert len(groups) == m["groups"]
    assert all(len(g) == 4 and len(set(g)) == 4 and set(g) <= train for g in groups)
    # re-ranking starts from the dual encoder's own ranking of the held-out items
    ev, dual = run.outcomes["reranker_eval"].metrics, run.outcomes["dual_eval"].metrics
    assert ev["first_stage_rsum"] == pytest.approx(dual["rsum"])
    assert ev["media"] == dual["media"] and not set(dual_held_out(store, run)) & train
    fused = run.outcomes["reranker_fused"].metrics
    assert fused["first_stage_rsum"] == pytest.approx(dual["rsum"]) and fused["k"] == 4
    # cross-fitted: trained on the training items its first stage (dual_half) never saw, only
    cf = run.outcomes["reranker_cf"].metrics
    half = dict(inputs, first_stage=str(store.open(run.outcomes["dual_half"].key).path),
                negatives=str(store.open(run.outcomes["dual_half_unseen_ranks"].key).path))
    seen = set(rec._nested_split(half["media"], RerankOptions(held_out_share=0.6).model_dump(), options)[0])
    unseen = set(state["chosen"]) - seen
    assert seen and unseen and cf["anchors_not_ranked"] == len(seen)
    state = rec.encoder(half, options, load_backbone(str(backbone_dir)).tokenizer, 16)
    groups = [row["media"] for unit in rec.units(half, options, None)
              for row in rec.encode(state, half, unit)[0]]
    assert len(groups) == cf["groups"] > 0 and all(set(g) <= unseen for g in groups)
    for stage, first in (("reranker_cf_on_dual", dual), ("reranker_cf_on_dual_fused", dual)):
        assert run.outcomes[stage].metrics["first_stage_rsum"] == pytest.approx(first["rsum"])
    assert run.outcomes["reranker_cf_eval"].metrics["media"] == dual["media"]   # the same held-out 20%


def dual_held_out(store: ArtifactStore, run) -> list[str]:
    ranks = pq.read_table(store.open(run.outcomes["dual_eval"].key).path / "ranks.parquet")
    return [q.split("#")[0] for q in ranks["query_id"].to_pylist()]


def test_score_fusion_standardises_each_query_s_candidates():
    from fusion.retrieval.metrics import fuse_zscore
    from fusion.retrieval.params import RetrievalParams

    g = torch.Generator().manual_seed(0)
    cross, first = torch.randn(5, 4, generator=g) * 30, torch.randn(5, 4, generator=g) * 0.1
    first[2] = 0.7   # a query whose first-stage scores tie: they add nothing
    got = fuse_zscore(cross, first)
    for q in range(5):
        c, f = cross[q].double(), first[q].double()
        want = (c - c.mean()) / c.std(unbiased=False)
        if f.std() > 0:
            want = want + (f - f.mean()) / f.std(unbiased=False)
        torch.testing.assert_close(got[q].double(), want, atol=1e-5, rtol=1e-5)
    assert "fuse" not in RetrievalParams().model_dump() and RetrievalParams(fuse="zscore").fuse == "zscore"
    with pytest.raises(ValueError, match="mode rerank"):
        RetrievalParams(mode="dual", fuse="zscore")


def test_frozen_streams_leave_only_the_cross_layers_to_train(backbone, tokenizer):
    model = tiny(backbone, stream_lr_scale=0.0, contrastive_weight=0.0).train()
    (only,) = model.param_groups(1e-3)
    names = {id(p): n for n, p in model.encoder.named_parameters()}
    assert not any(names[id(p)].startswith(STREAMS) for p in only["params"])
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if n.startswith(STREAMS)}
    opt = torch.optim.AdamW(model.param_groups(1e-2))
    model.loss(grouped_batch(tokenizer, 2, 4))["total"].backward()
    opt.step()
    for n, p in model.encoder.named_parameters():
        if n.startswith(STREAMS):
            assert torch.equal(p, before[n]) and p.grad is None, n
    assert any(p.grad is not None for p in only["params"])
    with pytest.raises(ValueError, match="set contrastive_weight 0"):
        tiny(backbone, stream_lr_scale=0.0, contrastive_weight=1.0)


def test_frozen_streams_run_without_dropout_while_the_cross_layers_train(backbone, tokenizer):
    """Frozen streams feed the cross layers in training what they feed them when re-ranking."""
    frozen = tiny(backbone, quiet=False, stream_lr_scale=0.0, contrastive_weight=0.0).train()
    modes = {n: m.training for n, m in frozen.encoder.named_modules() if n}
    assert modes and not any(t for n, t in modes.items() if f"{n}.".startswith(STREAMS))
    assert any(t for n, t in modes.items() if n.startswith("x_layers"))
    batch = grouped_batch(tokenizer, 2, 4)
    torch.manual_seed(1)
    a = frozen.text_states(batch)["states"]
    torch.manual_seed(2)
    assert torch.equal(a, frozen.text_states(batch)["states"])       # no dropout: the same states
    trained = tiny(backbone, quiet=False, stream_lr_scale=0.1).train()
    assert all(m.training for n, m in trained.encoder.named_modules() if n)
    torch.manual_seed(1)
    a = trained.text_states(batch)["states"]
    torch.manual_seed(2)
    assert not torch.equal(a, trained.text_states(batch)["states"])  # trained streams keep dropout


def test_negatives_interleave_both_directions_each_item_once(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({
        "direction": ["text_to_media", "media_to_text", "text_to_media", "media_to_text"],
        "query_id": ["a#0", "a", "b#0", "b"],
        "top_ids": [["a", "c", "d", "e"], ["a#0", "d#1", "f#0", "c#0"], ["c", "b"], ["b#0"]]}),
        tmp_path / "ranks.parquet")
    both = RerankRecipe._rankings(str(tmp_path), ["a", "b", "z"], "both")
    # a, a, c, d, d, f, e, c; z was not ranked (cross-fitted: the first stage trained on it)
    assert both == {"a": ["a", "c", "d", "f", "e"], "b": ["c", "b"]}
    assert RerankRecipe._rankings(str(tmp_path), ["a"], "text_to_media") == {"a": ["a", "c", "d", "e"]}


def test_groups_skip_held_out_and_captionless_items_and_count_them(tmp_path, tokenizer):
    import pyarrow as pa

    from fusion.pairs import load_pairs

    media = make_feature_artifact(tmp_path / "media", captions={"red-dog": []})
    _, train_caps, _ = load_pairs(media, "train", 0.2, 0)
    train = sorted({c.rsplit("#", 1)[0] for c in train_caps.ids})
    _, test_caps, _ = load_pairs(media, "test", 0.2, 0)
    held_out = sorted({c.rsplit("#", 1)[0] for c in test_caps.ids})
    assert "red-dog" not in train and held_out
    everything = held_out[:2] + ["red-dog"] + train            # what a careless ranking could name
    pq.write_table(pa.table({"direction": ["text_to_media"] * len(train),
                             "query_id": [f"{i}#0" for i in train],
                             "top_ids": [everything] * len(train)}), tmp_path / "ranks.parquet")
    rec, options = RerankRecipe(), RerankOptions(group=4)
    inputs = {"media": str(media), "negatives": str(tmp_path)}
    state = rec.encoder(inputs, options, tokenizer, 16)
    rows, counts = [], {}
    for unit in rec.units(inputs, options, None):
        r, c = rec.encode(state, inputs, unit)
        rows += r
        counts = {k: counts.get(k, 0) + v for k, v in c.items()}
    from fusion.pretrain.media_recipes import train_items

    captionless_trains = "red-dog" in train_items(str(media), options)[0]
    assert counts["groups"] == len(rows) == len(train)
    assert counts["negatives_not_train"] == (2 + (not captionless_trains)) * len(train)
    assert counts.get("negatives_without_text", 0) == captionless_trains * len(train)
    assert counts["train_items_without_text"] == captionless_trains
    for row in rows:
        assert row["media"][0] not in row["media"][1:] and set(row["media"]) <= set(train)
        assert "red-dog" not in row["media"] and all(row["captions"])


def test_an_item_sharing_the_anchors_caption_is_not_its_negative(tmp_path, tokenizer):
    import pyarrow as pa

    from fusion.pretrain.media_recipes import train_items

    probe = make_feature_artifact(tmp_path / "probe")
    a, twin, *rest = train_items(str(probe), RerankOptions())[0]
    # the same emoji in two art styles: one caption, up to case and spaces
    media = make_feature_artifact(tmp_path / "media", captions={a: ["The Red Dog"], twin: [" the red dog "]})
    order = [a, twin, *rest[:4]]
    pq.write_table(pa.table({"direction": ["text_to_media"] * 2, "query_id": [f"{a}#0", f"{twin}#0"],
                             "top_ids": [order, [twin, a, *rest[:4]]]}), tmp_path / "ranks.parquet")
    rec, options = RerankRecipe(), RerankOptions(group=4)
    inputs = {"media": str(media), "negatives": str(tmp_path)}
    state = rec.encoder(inputs, options, tokenizer, 16)
    groups, counts = {}, {}
    for unit in rec.units(inputs, options, None):
        rows, c = rec.encode(state, inputs, unit)
        groups.update({r["media"][0]: r["media"][1:] for r in rows})
        counts = {k: counts.get(k, 0) + v for k, v in c.items()}
    assert groups == {a: rest[:3], twin: rest[:3]}      # each skips the other, in rank order
    assert counts["negatives_same_caption"] == 2


@pytest.mark.parametrize("options, message", [
    ({"config": {"x_layers": 3}}, "set by the recipe"),
    ({"config": {"bogus": 1}}, "unknown LxmertConfig field"),
    ({"listwise_weight": 0, "contrastive_weight": 0}, "nothing to train"),
    ({"stream_lr_scale": 0}, "set contrastive_weight 0"),
])
def test_options_that_cannot_train_fail_when_the_pipeline_is_read(options, message):
    """Checked by the options model (before Ray starts), not inside a training worker."""
    from pydantic import ValidationError

    from fusion.pretrain.rerank_recipe import RerankOptions

    with pytest.raises(ValidationError, match=message):
        RerankOptions(**options)
    assert RerankOptions(stream_lr_scale=0, contrastive_weight=0, config={"dropout": 0.2}).group == 8

