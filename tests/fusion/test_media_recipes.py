"""Multimodal recipes through ``fusion.pretrain`` (Ray Train) and ``fusion.retrieval`` on a synthetic
feature artifact: the models learn to match captions to media, the artifacts load back, and the
retrieval protocol's modes agree where they must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion.retrieval.stage import RetrievalParams, evaluate
from fusion.pretrain.loop import load_pretrained
from fusion.pretrain.stage import PretrainParams
from pipeline import StageFailed

from .conftest import MEDIA_RUN, make_feature_artifact, run_pretrain

# A 32-wide model at BERT's init (std 0.02) sits on the matching plateau (ITM loss log 2) for
# thousands of steps on this data; a wider init (0.2) leaves it in a few hundred.
TINY_LXMERT = {"r_layers": 1, "x_layers": 1, "held_out_share": 0.25,
               "config": {"initializer_range": 0.2, "dropout": 0.0, "attention_dropout": 0.0}}
TINY_VILBERT = {"held_out_share": 0.25, "config": {
    "visual_hidden_size": 32, "visual_heads": 2, "visual_intermediate_size": 64,
    "coattention_hidden_size": 32, "coattention_heads": 2}}


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, feature_artifact, backbone_dir) -> dict[str, Path]:
    """One short run per recipe (module scope: Ray Train start-up is the cost)."""
    tmp = tmp_path_factory.mktemp("mm")
    runs = {}
    # LXMERT's matching loss drops in one jump whose step depends on which items train (between
    # 250 and 650 steps on the splits seen): 800 leaves room.
    for name, options, steps in (("lxmert", TINY_LXMERT, 800), ("dual", TINY_LXMERT | {"x_layers": 0}, 120),
                                 ("vilbert", TINY_VILBERT, 60)):
        runs[name] = run_pretrain(tmp, name, {"media": feature_artifact},
                                  MEDIA_RUN | {"backbone": str(backbone_dir), "recipe": name,
                                               "options": options, "steps": steps})
    return runs


def test_options_are_checked_when_the_pipeline_loads():
    with pytest.raises(ValueError, match="unknown LxmertConfig field"):
        PretrainParams.model_validate({"recipe": "lxmert", "options": {"config": {"x_layerz": 1}}})
    with pytest.raises(ValueError, match="set by the recipe"):
        PretrainParams.model_validate({"recipe": "vilbert", "options": {"config": {"feature_dim": 8}}})
    with pytest.raises(ValueError, match="x_layers"):
        PretrainParams.model_validate({"recipe": "dual", "options": {"x_layers": 2}})


def test_each_recipe_trains_on_the_train_split_and_loads_back(trained, feature_artifact):
    from fusion.pairs import load_pairs

    _, caps, _ = load_pairs(feature_artifact, "train", 0.25, 0)
    for name, (metrics, out) in trained.items():
        assert metrics["train_items"] == len({m for m in caps.media}), name   # test items never trained
        assert metrics["examples"] == metrics["train_media_with_text"]
        rec, options, backbone, model, meta = load_pretrained(out)
        assert meta["recipe"] == name and meta["resources_meta"]["feature_dim"] == 16
        assert not model.training
    lx = trained["lxmert"][0]
    assert lx["loss_contrastive_last10"] < 0.5 * lx["loss_contrastive_first"]
    assert lx["loss_itm_last10"] < 0.8 * lx["loss_itm_first"]          # matching is learned
    assert trained["dual"][0]["loss_contrastive_last10"] < 0.5 * trained["dual"][0]["loss_contrastive_first"]
    assert set(trained["dual"][0]) >= {"loss_contrastive_first"} and "loss_itm_first" not in trained["dual"][0]
    vb = trained["vilbert"][0]
    assert {"loss_mlm_first", "loss_region_feature_first", "loss_align_first"} <= set(vb)


def test_group_by_puts_each_training_item_s_group_in_the_corpus_and_counts_items_without_one(
        ray_local, tmp_path, backbone_dir):
    """``group_by: colour``: every corpus row carries its item's colour as its group (what the
    workers batch by), an item without the field is a group of its own, counted; a field no item
    has fails before training; the re-ranker, whose examples are groups already, refuses it."""
    import pyarrow.parquet as pq

    from fusion.pairs import load_pairs
    from tests.fusion.conftest import COLOURS, NOUNS

    ids = [f"{c}-{n}" for c in COLOURS for n in NOUNS]
    bank, _, _ = load_pairs(make_feature_artifact(tmp_path / "plain"), "train", 0.25, 0)
    train = sorted(bank.ids)
    lone = train[0]
    art = make_feature_artifact(tmp_path / "f",
                                meta={i: {"colour": i.split("-")[0]} for i in ids if i != lone})
    metrics, _ = run_pretrain(tmp_path, "dual", {"media": art}, MEDIA_RUN | {
        "backbone": str(backbone_dir), "recipe": "dual", "steps": 4,
        "options": TINY_LXMERT | {"x_layers": 0, "group_by": "colour"}})
    assert metrics["items_without_group_by_field"] == 1
    rows = [r for p in sorted((tmp_path / "state-dual" / "corpus").glob("part-*.parquet"))
            for r in pq.read_table(p, columns=["media", "group"]).to_pylist()]
    assert sorted(r["media"] for r in rows) == train
    assert all(r["group"] == (f"item {lone}" if r["media"] == lone else r["media"].split("-")[0])
               for r in rows)
    with pytest.raises(StageFailed, match=r"group_by 'colours': no item .* \(fields seen: \['colour'\]\)"):
        run_pretrain(tmp_path, "typo", {"media": art}, MEDIA_RUN | {   # a misspelt field: before training
            "backbone": str(backbone_dir), "recipe": "dual", "steps": 4,
            "options": TINY_LXMERT | {"x_layers": 0, "group_by": "colours"}})
    with pytest.raises(ValueError, match="already groups"):
        PretrainParams.model_validate({"recipe": "rerank", "options": {"group_by": "colour"}})


@pytest.mark.parametrize("name", ["lxmert", "vilbert"])
def test_split_scoring_equals_the_full_cross_encoder(trained, feature_artifact, name):
    """text_states / media_states once, score_states per pair == match_score on the pair."""
    from fusion.pairs import load_pairs

    _, _, backbone, model, _ = load_pretrained(trained[name][1])
    bank, caps, _ = load_pairs(feature_artifact, "all")
    enc = backbone.tokenizer(caps.texts[:6], padding=True, return_tensors="pt")
    text = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    media = bank.batch([5, 1, 2, 3, 4, 0])
    with torch.no_grad():
        full = model.match_score(text, media)
        split = model.score_states(model.text_states(text), model.media_states(media))
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)


def _eval(trained, media, tmp_path, name="lxmert", **params):
    return evaluate(trained[name][1], media, tmp_path, RetrievalParams(**params))


def test_a_diverged_model_fails_the_evaluation_instead_of_scoring_well(trained, feature_artifact, tmp_path):
    """A checkpoint whose weights hold a NaN gives NaN vectors; ranked, every query would find its
    correct item first. The stage stops and says which vectors."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "diverged"
    shutil.copytree(trained["dual"][1], bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 2)
    weights[name][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(StageFailed, match=r"vectors are not finite \(the first: "):
        evaluate(bad, feature_artifact, tmp_path / "out", RetrievalParams(mode="dual", split="all"))


def test_rerank_with_k_all_equals_all_pairs(trained, feature_artifact, tmp_path):
    full = _eval(trained, feature_artifact, tmp_path / "a", mode="all_pairs", split="all")
    re = _eval(trained, feature_artifact, tmp_path / "b", mode="rerank", k=42, split="all")
    keys = [k for k in full if "R@" in k or "rank" in k or "mAP" in k]
    assert {k: full[k] for k in keys} == pytest.approx({k: re[k] for k in keys})
    assert full["pairs_scored"] == 42 * 42 and re["pairs_scored"] == 42 * 42
    small = _eval(trained, feature_artifact, tmp_path / "c", mode="rerank", k=4, split="all")
    assert small["pairs_scored"] < 2 * 42 * 4 + 1
    # another model's vectors as the first stage (a dual encoder re-ranked by the cross-encoder)
    fs = evaluate(trained["lxmert"][1], feature_artifact, tmp_path / "d",
                  RetrievalParams(mode="rerank", k=42, split="all"), first_stage_dir=trained["dual"][1])
    assert {k: fs[k] for k in keys} == pytest.approx({k: full[k] for k in keys})   # k = all: exact
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["first_stage"] == "first_stage input"
    # on two Ray actors, each rebuilding the model and the split itself: the same scores
    actors = _eval(trained, feature_artifact, tmp_path / "e", mode="all_pairs", split="all", workers=2,
                   batch_size=16)
    assert {k: actors[k] for k in keys} == pytest.approx({k: full[k] for k in keys})


def test_trained_models_retrieve_held_out_items_better_than_chance(trained, feature_artifact, tmp_path):
    for name in ("lxmert", "dual"):
        m = _eval(trained, feature_artifact, tmp_path / name, name=name, mode="dual", split="all")
        # chance R@1 is 1/42; the colour and the noun make it learnable, the held-out quarter too
        assert m["text_to_media_R@1"] > 100 * 5 / 42 and m["media_to_text_R@1"] > 100 * 5 / 42, (name, m)
    out = tmp_path / "rerank"
    m = _eval(trained, feature_artifact, out, mode="rerank", k=8, split="all")
    assert m["text_to_media_R@1"] > 100 * 5 / 42, m   # the cross-encoder's re-ranking, too
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "rerank" and metrics["k"] == 8 and metrics["split"] == "all"
    assert metrics["counts"]["held_out_share"] == 0.25
    for f in ("ranks.parquet", "recall_at_k.png", "rank_hist.png", "examples.json"):
        assert (out / f).exists(), f
    import pyarrow.parquet as pq

    ranks = pq.read_table(out / "ranks.parquet").to_pylist()
    assert {r["direction"] for r in ranks} == {"text_to_media", "media_to_text"}
    assert all(1 <= r["rank"] <= metrics["counts"]["media"] for r in ranks if r["direction"] == "text_to_media")
    examples = json.loads((out / "examples.json").read_text())
    assert examples and all(len(e["results"]) == 5 and "correct" in e["results"][0] for e in examples)


def test_bad_input_is_a_clear_error_or_a_counted_skip(trained, tmp_path):
    wide = make_feature_artifact(tmp_path / "wide", dim=24)
    with pytest.raises(StageFailed, match="mismatched feature dimensions: .* 16-d .* 24-d"):
        _eval(trained, wide, tmp_path / "x")
    with pytest.raises(StageFailed, match="no cross-encoder"):
        _eval(trained, make_feature_artifact(tmp_path / "f1"), tmp_path / "y", name="dual", mode="all_pairs")
    # media whose captions are all empty: media -> text queries without a correct text are skipped
    # and counted, never averaged in as misses
    quiet = make_feature_artifact(tmp_path / "quiet", captions={"red-dog": [], "blue-cat": []})
    m = _eval(trained, quiet, tmp_path / "z", mode="dual", split="all")
    assert m["media_to_text_skipped_no_positive"] == 2 and m["text_to_media_skipped_no_positive"] == 0
    assert m["media"] == 42 and m["captions"] == 40


def test_stele_eval_retrieval_cli(trained, feature_artifact, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "cli"
    rc = main(["eval", "retrieval", "--model", str(trained["lxmert"][1]), "--media",
               str(feature_artifact), "--mode", "rerank", "--k", "5", "--fuse", "zscore", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "retrieval (rerank, k=5, fuse=zscore)" in printed and "text to media: R@1" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["k"] == 5 and metrics["fuse"] == "zscore" and metrics["split"] == "test"
    rc = main(["eval", "retrieval", "--model", str(trained["dual"][1]), "--media",
               str(feature_artifact), "--mode", "all_pairs", "--out", str(tmp_path / "no")])
    assert rc == 1 and "no cross-encoder" in capsys.readouterr().out


def test_shard_rows_reads_only_the_row_groups_of_the_kept_items(tmp_path, monkeypatch):
    """The picked items, in shard order, equal to a whole-shard read; blobs come only from the row
    groups holding one (a re-ranker picking 7 negatives must not read every shard whole)."""
    import pyarrow.parquet as pq

    from fusion.pretrain.media_recipes import feature_shards, shard_rows

    art = make_feature_artifact(tmp_path / "media")
    (shard,) = feature_shards(str(art))
    whole = pq.read_table(art / shard)
    pq.write_table(whole, art / shard, row_group_size=5)      # 42 rows: 9 groups (the last of 2)
    ids = whole["id"].to_pylist()
    keep = {ids[3], ids[11], ids[12], ids[41], "not-in-the-shard"}   # groups 0, 2 and 8
    read: list[list[int]] = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or original(self, groups, **kw))
    got = list(shard_rows(str(art), shard, keep, max_regions=2))
    assert read == [[0, 2, 8]]
    dim = 16
    want = [{"media": i, "n_regions": min(n, 2), "features": f[:min(n, 2) * dim * 2],
             "boxes": b[:min(n, 2) * 16]}
            for i, n, f, b in zip(*(whole[c].to_pylist() for c in ("id", "n_regions", "features", "boxes")))
            if i in keep]
    assert [r["media"] for r in got] == [ids[3], ids[11], ids[12], ids[41]]
    assert got == want
    assert list(shard_rows(str(art), shard, {"not-in-the-shard"}, None)) == []
    assert len(list(shard_rows(str(art), shard, set(ids), None))) == 42
