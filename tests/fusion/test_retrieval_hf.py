"""A Hugging Face ``CLIPModel`` from a local folder as a dual encoder in ``fusion.retrieval``: a tiny
random model saved with ``save_pretrained``, raw images through the media artifact's dataset; the
scores are the model's own ``logits_per_text``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import make_feature_artifact

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
NOUNS = ["dog", "cat", "river", "city"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random CLIPModel (hidden 32, 2 layers, 32-pixel images) with the tests' WordPiece
    tokenizer (its [SEP] ends a caption, so it is CLIP's eos) and a CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
                     "eos_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    d = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(cfg).eval().save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(str(d))
    return d


def _images(root: Path) -> dict:
    """12 small PNGs (a colour and a noun's pattern) and captions.tsv; the image_folder dataset."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image\tcaption"]
    for c, rgb in COLOURS.items():
        for k, n in enumerate(NOUNS):
            px = np.clip(np.array(rgb) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            px[k * 10:(k + 1) * 10] = 255 - px[k * 10:(k + 1) * 10]
            Image.fromarray(px).save(root / f"{c}-{n}.png")
            rows += [f"{c}-{n}.png\tthe {c} {n}", f"{c}-{n}.png\ta {n} that is {c}"]
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    return {"type": "image_folder", "captions": str(root / "captions.tsv")}


@pytest.fixture(scope="module")
def clip_media(tmp_path_factory) -> Path:
    """A feature artifact over the 12 images (features are not what CLIP reads: its own pixels are),
    whose manifest names the image_folder dataset it came from."""
    tmp = tmp_path_factory.mktemp("clip-media")
    spec = _images(tmp / "images")
    caps = {f"{c}-{n}": [f"the {c} {n}", f"a {n} that is {c}"] for c in COLOURS for n in NOUNS}
    art = make_feature_artifact(tmp / "features", captions=caps)
    # keep the 12 items that have images: rewrite the listing and the manifest
    import pyarrow.parquet as pq

    items = pq.read_table(art / "items.parquet")
    keep = [i in caps for i in items["id"].to_pylist()]
    pq.write_table(items.filter(keep), art / "items.parquet")
    (art / "manifest.json").write_text(json.dumps({"params": {"global_token": True, "dataset": spec}}))
    return art


def _reference(clip_dir: Path, clip_media: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """CLIPModel's own logits_per_text over every caption and image of the artifact, one batch."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from fusion.pairs import load_pairs

    bank, caps, _ = load_pairs(clip_media, "all")
    spec = json.loads((clip_media / "manifest.json").read_text())["params"]["dataset"]
    root = Path(spec["captions"]).parent
    images = [Image.open(root / f"{i}.png").convert("RGB") for i in bank.ids]
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    proc = AutoImageProcessor.from_pretrained(str(clip_dir))
    enc = tok(caps.texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    return caps.ids, bank.ids, out.logits_per_text


def test_hf_clip_scores_are_its_own_logits_per_text(clip_dir, clip_media):
    from fusion.retrieval.protocol import _hf_dual
    from fusion.retrieval.stage import RetrievalParams

    text_ids, media_ids, logits = _reference(clip_dir, clip_media)
    params = RetrievalParams(hf_model=str(clip_dir), split="all", encode_batch_size=5)  # several batches
    ids, texts, m_ids, scores, counts = _hf_dual(clip_media, params, logging.getLogger("test"))
    assert (ids, m_ids) == (text_ids, media_ids) and len(ids) == 24 and len(m_ids) == 12
    torch.testing.assert_close(scores.rows("text_to_media", slice(0, 24)), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores.rows("media_to_text", slice(0, 12)), logits.T, rtol=1e-4, atol=1e-5)


def test_stele_eval_retrieval_with_a_local_clip_folder(clip_dir, clip_media, tmp_path, capsys):
    from fusion.retrieval.metrics import relevance_matrix, retrieval_metrics
    from pipeline.cli import main

    text_ids, media_ids, logits = _reference(clip_dir, clip_media)
    out = tmp_path / "clip"
    rc = main(["eval", "retrieval", "--hf-model", str(clip_dir), "--media", str(clip_media), "--split",
               "all", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"retrieval (dual, hf_model {clip_dir.name})" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    want = retrieval_metrics(logits, relevance_matrix(text_ids, media_ids,
                                                      [(t, t.split("#")[0]) for t in text_ids]))
    for d in ("text_to_media", "media_to_text"):
        assert metrics[d] == pytest.approx(want[d], rel=1e-5, abs=1e-4), d
    examples = json.loads((out / "examples.json").read_text())
    assert any(r["thumbnail"] for e in examples for r in e["results"])   # images read back
    # the default split is the dataset's own, else the hash split: a model from elsewhere has none
    rc = main(["eval", "retrieval", "--hf-model", str(clip_dir), "--media", str(clip_media),
               "--out", str(tmp_path / "t")])
    assert rc == 1 and "use split 'all'" in " ".join(capsys.readouterr().out.split())


def test_a_hub_name_fails_at_once_and_nothing_is_downloaded(clip_media, tmp_path, capsys, monkeypatch):
    import time

    from pipeline.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rc = main(["eval", "retrieval", "--hf-model", "openai/clip-vit-base-patch32", "--media", str(clip_media),
               "--split", "all", "--out", str(tmp_path / "x")])
    printed = " ".join(capsys.readouterr().out.split())
    assert rc == 1 and "is not a local folder (nothing is downloaded" in printed, printed
    assert time.perf_counter() - t0 < 5
    (tmp_path / "empty").mkdir()
    rc = main(["eval", "retrieval", "--hf-model", str(tmp_path / "empty"), "--media", str(clip_media),
               "--split", "all", "--out", str(tmp_path / "y")])
    assert rc == 1 and "has no config.json" in capsys.readouterr().out


PIPELINE = """\
name: clip-eval
stages:
  images:
    uses: vision.features
    with: {{dataset: {dataset}, backbone: resnet10t, mode: pooled}}
  eval:
    uses: fusion.retrieval
    inputs: {{media: images}}
    with: {{hf_model: {clip}, split: all, examples: 2}}
"""


def test_a_pipeline_evaluates_a_local_clip_folder_on_a_feature_stage(ray_local, clip_dir, clip_media,
                                                                     tmp_path):
    from rich.console import Console

    from pipeline.runner import run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    spec = json.loads((clip_media / "manifest.json").read_text())["params"]["dataset"]
    text = PIPELINE.format(dataset=json.dumps(spec), clip=str(clip_dir))
    store = ArtifactStore(tmp_path / "store")
    console = Console(record=True, width=200)
    result = run(parse_pipeline(text), store, console=console, live=False)
    assert result.outcomes["eval"].status == "ran", console.export_text()
    metrics = json.loads((store.open(result.outcomes["eval"].key) / "metrics.json").read_text())
    text_ids, media_ids, logits = _reference(clip_dir, clip_media)
    from fusion.retrieval.metrics import relevance_matrix, retrieval_metrics

    want = retrieval_metrics(logits, relevance_matrix(text_ids, media_ids,
                                                      [(t, t.split("#")[0]) for t in text_ids]))
    assert metrics["counts"]["captions"] == 24 and metrics["counts"]["media"] == 12
    assert metrics["text_to_media"] == pytest.approx(want["text_to_media"], rel=1e-5, abs=1e-4)


# ----------------------------------------------------------------------------------- cross-encoders
@pytest.fixture(scope="module", params=["lxmert", "visual_bert"])
def cross_dir(request, tmp_path_factory, tokenizer) -> Path:
    """A tiny random LxmertForPreTraining / VisualBertForPreTraining over 16-d regions (the feature
    fixture's width), saved with its tokenizer."""
    from transformers import LxmertConfig, LxmertForPreTraining, VisualBertConfig, VisualBertForPreTraining

    torch.manual_seed(0)
    common = {"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64, "initializer_range": 0.2}
    if request.param == "lxmert":
        model = LxmertForPreTraining(LxmertConfig(**common, l_layers=1, x_layers=1, r_layers=1,
                                                  visual_feat_dim=16, visual_pos_dim=4, num_qa_labels=2,
                                                  num_object_labels=4, num_attr_labels=4))
    else:
        model = VisualBertForPreTraining(VisualBertConfig(**common, num_hidden_layers=2,
                                                          visual_embedding_dim=16))
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.eval().save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def test_hf_cross_encoder_scores_are_its_own_matching_head(cross_dir, feature_artifact):
    from fusion.pairs import load_pairs
    from fusion.retrieval.hf import HFCrossEncoder

    enc = HFCrossEncoder(str(cross_dir))
    bank, caps, _ = load_pairs(feature_artifact, "all")
    tok = enc.tokenizer(caps.texts[:6], padding=True, return_tensors="pt")
    media = bank.batch([5, 1, 2, 3, 4, 0])
    with torch.no_grad():
        ours = enc.score_states(enc.text_states(tok), enc.media_states(media))
        feats, vmask = media["features"].float(), media["region_mask"].long()
        if enc.kind == "lxmert":
            logits = enc.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                               visual_feats=feats, visual_pos=media["boxes"],
                               visual_attention_mask=vmask).cross_relationship_score
            want = logits[:, 1] - logits[:, 0]                   # matched_label 1: it matches
        else:
            logits = enc.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                               visual_embeds=feats, visual_attention_mask=vmask).seq_relationship_logits
            want = logits[:, 0] - logits[:, 1]                   # sentence_image_labels 0: it matches
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_hf_cross_encoder_rerank_with_k_all_equals_all_pairs(cross_dir, feature_artifact, tmp_path, capsys):
    from pipeline.cli import main

    from .test_retrieval_external import ITEMS, _vectors, write_vectors

    ids, text, media_ids, media = _vectors()
    tv = write_vectors(tmp_path / "text.npy", ids, text)
    mv = write_vectors(tmp_path / "media.safetensors", media_ids, media)
    base = ["eval", "retrieval", "--hf-model", str(cross_dir), "--media", str(feature_artifact), "--split",
            "all", "--batch-size", "64"]
    runs = {"all": ["--mode", "all_pairs"],
            "k_all": ["--text-vectors", str(tv), "--media-vectors", str(mv), "--k", str(len(ITEMS))],
            "k5": ["--text-vectors", str(tv), "--media-vectors", str(mv), "--k", "5"]}
    got = {}
    for name, argv in runs.items():
        rc = main([*base, *argv, "--out", str(tmp_path / name)])
        printed = capsys.readouterr().out
        assert rc == 0, printed
        got[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert got["k_all"]["mode"] == "rerank" and got["all"]["mode"] == "all_pairs"
    for d in ("text_to_media", "media_to_text"):
        assert got["k_all"][d] == pytest.approx(got["all"][d]), d
    assert got["all"]["timing"]["pairs_scored"] == 42 * 42 == got["k_all"]["timing"]["pairs_scored"]
    assert got["k5"]["timing"]["pairs_scored"] <= 2 * 42 * 5
    assert got["k5"]["first_stage"].startswith("text_vectors text.npy")
    # rerank without a first stage, and regions of another width, are one-line errors
    rc = main([*base, "--mode", "rerank", "--out", str(tmp_path / "x")])
    assert rc == 1 and "rerank needs a first stage" in capsys.readouterr().out
    wide = make_feature_artifact(tmp_path / "wide", dim=24)
    rc = main(["eval", "retrieval", "--hf-model", str(cross_dir), "--media", str(wide), "--split", "all",
               "--out", str(tmp_path / "y")])
    assert rc == 1 and "takes 16-d region features, artifact wide has 24-d" in capsys.readouterr().out


def test_hf_cross_encoder_scores_on_ray_actors_as_in_process(ray_local, cross_dir, feature_artifact, tmp_path,
                                                             capsys):
    """``workers: 2``: each actor rebuilds the model and the split from the folder and the artifact, the
    same call as the stage's own, so the pairs it is handed mean the same and score the same."""
    from pipeline.cli import main

    got = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        rc = main(["eval", "retrieval", "--hf-model", str(cross_dir), "--media", str(feature_artifact),
                   "--split", "all", "--mode", "all_pairs", "--batch-size", "16", "--workers", str(workers),
                   "--out", str(out)])
        assert rc == 0, capsys.readouterr().out
        got[workers] = json.loads((out / "metrics.json").read_text())
    assert got[2]["timing"]["pairs_scored"] == got[1]["timing"]["pairs_scored"] == 42 * 42
    for d in ("text_to_media", "media_to_text"):
        assert got[2][d] == pytest.approx(got[1][d], abs=1e-6), d
