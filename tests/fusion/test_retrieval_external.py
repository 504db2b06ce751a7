"""Models from elsewhere in ``fusion.retrieval``: precomputed vectors and score matrices in each file
format, their checks, ``stele eval retrieval`` and a pipeline over them, scored by the same protocol
as stele's own models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.retrieval.external import FormatError, load_scores, load_vectors

from .conftest import COLOURS, NOUNS, make_feature_artifact

ITEMS = [f"{c}-{n}" for c in COLOURS for n in NOUNS]          # make_feature_artifact's 42 item ids


def _vectors(seed: int = 0, dim: int = 8, noise: float = 1.0) -> tuple[list[str], np.ndarray, list[str],
                                                                       np.ndarray]:
    """Caption vectors (``<item>#0``, the item's vector plus noise) and item vectors."""
    rng = np.random.default_rng(seed)
    media = rng.normal(size=(len(ITEMS), dim)).astype(np.float32)
    text = (media + noise * rng.normal(size=media.shape)).astype(np.float32)
    return [f"{i}#0" for i in ITEMS], text, list(ITEMS), media


def write_vectors(path: Path, ids: list[str], vectors: np.ndarray) -> Path:
    """``vectors`` with their ``ids`` in the format ``path``'s suffix names."""
    if path.suffix == ".npy":
        np.save(path, vectors)
        path.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"vectors": vectors}, str(path), metadata={"ids": json.dumps(ids)})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ids, "vector": [v.tolist() for v in vectors]}), path)
    return path


def write_scores(path: Path, text_ids: list[str], media_ids: list[str], scores: np.ndarray) -> Path:
    if path.suffix == ".npy":
        np.save(path, scores)
        path.with_suffix(".text_ids.txt").write_text("\n".join(text_ids))
        path.with_suffix(".media_ids.txt").write_text("\n".join(media_ids))
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"scores": scores}, str(path),
                  metadata={"text_ids": json.dumps(text_ids), "media_ids": json.dumps(media_ids)})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        t, m = np.meshgrid(np.arange(len(text_ids)), np.arange(len(media_ids)), indexing="ij")
        order = np.random.default_rng(0).permutation(t.size)          # any row order
        pq.write_table(pa.table({"text_id": [text_ids[i] for i in t.ravel()[order]],
                                 "media_id": [media_ids[i] for i in m.ravel()[order]],
                                 "score": scores.ravel()[order]}), path)
    return path


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".parquet"])
def test_each_vector_and_score_format_loads_the_same(tmp_path, suffix):
    ids, text, media_ids, media = _vectors()
    v = load_vectors(str(write_vectors(tmp_path / f"text{suffix}", ids, text)))
    assert v.ids == ids and torch.equal(v.vectors, torch.from_numpy(text))
    scores = text @ media.T
    s = load_scores(str(write_scores(tmp_path / f"scores{suffix}", ids, media_ids, scores)))
    assert sorted(s.text_ids) == sorted(ids) and sorted(s.media_ids) == sorted(media_ids)
    rows, cols = [ids.index(i) for i in s.text_ids], [media_ids.index(i) for i in s.media_ids]
    # (Parquet: ids in the order they first appear)
    torch.testing.assert_close(s.scores, torch.from_numpy(scores[rows][:, cols]), rtol=0, atol=0)
    half = load_vectors(str(write_vectors(tmp_path / f"half{suffix}", ids, text.astype(np.float16))))
    assert half.vectors.dtype == torch.float32                        # any float width, read as float32


def _bad_cases(tmp: Path) -> list[tuple[Path, str, str]]:
    """(file, loader, expected message) for each check."""
    ids, text, media_ids, media = _vectors()
    cases = []
    p = write_vectors(tmp / "short.npy", ids, text)
    p.with_suffix(".ids.txt").write_text("\n".join(ids[:-1]))
    cases.append((p, "vectors", r"short.ids.txt: ids: 41 ids for 42 rows of short.npy"))
    cases.append((write_vectors(tmp / "dup.safetensors", ids[:-1] + ids[:1], text), "vectors",
                  r"dup.safetensors: ids: duplicate id 'red-dog#0'"))
    nan = text.copy()
    nan[3, 2] = np.nan
    cases.append((write_vectors(tmp / "nan.parquet", ids, nan), "vectors",
                  r"nan.parquet: vector: row 3 holds NaN or infinite values"))
    p = tmp / "noids.npy"
    np.save(p, text)
    cases.append((p, "vectors", r"noids.npy: ids: no ids file noids.ids.txt beside it"))
    p = tmp / "ints.npy"
    write_vectors(p, ids, text.astype(np.int32))
    cases.append((p, "vectors", r"ints.npy: vectors: must be floating point \(got int32\)"))
    p = tmp / "obj.npy"
    np.save(p, np.array([{"a": 1}] * 42, dtype=object), allow_pickle=True)
    p.with_suffix(".ids.txt").write_text("\n".join(ids))
    cases.append((p, "vectors", r"obj.npy: vectors: cannot be read without pickle"))
    from safetensors.numpy import save_file

    save_file({"emb": text}, str(tmp / "name.safetensors"), metadata={"ids": json.dumps(ids)})
    cases.append((tmp / "name.safetensors", "vectors",
                  r"name.safetensors: vectors: no such tensor \(the file has: emb\)"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ids[:2], "vector": [[1.0, 2.0], [1.0]]}), tmp / "ragged.parquet")
    cases.append((tmp / "ragged.parquet", "vectors",
                  r"ragged.parquet: vector: row 1 has 1 values, row 0 has 2"))
    (tmp / "text.csv").write_text("x")
    cases.append((tmp / "text.csv", "vectors",
                  r"text.csv: vectors must be one of .npy, .safetensors, .parquet"))
    scores = text @ media.T
    p = write_scores(tmp / "s.parquet", ids, media_ids, scores)
    t = pq.read_table(p).slice(1)                                      # one pair without a score
    pq.write_table(t, tmp / "missing.parquet")
    cases.append((tmp / "missing.parquet", "scores",
                  r"missing.parquet: score: 1 of the 42 x 42 .* have no score"))
    pq.write_table(pa.concat_tables([pq.read_table(p), pq.read_table(p).slice(0, 1)]), tmp / "twice.parquet")
    cases.append((tmp / "twice.parquet", "scores", r"twice.parquet: score: pair .* appears more than once"))
    p = write_scores(tmp / "cols.npy", ids, media_ids[:-1], scores)
    cases.append((p, "scores", r"cols.media_ids.txt: media_ids: 41 ids for 42 columns of cols.npy"))
    return cases


def test_bad_files_are_one_line_errors_naming_the_file_and_the_field(tmp_path):
    for path, loader, message in _bad_cases(tmp_path):
        with pytest.raises(FormatError, match=message) as e:
            (load_vectors if loader == "vectors" else load_scores)(str(path))
        assert "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture()
def model_files(tmp_path) -> dict[str, Path]:
    """Vectors (.npy and .parquet), the same model as a score matrix, and a pairs file."""
    ids, text, media_ids, media = _vectors()
    out = {"text": write_vectors(tmp_path / "text.npy", ids, text),
           "media": write_vectors(tmp_path / "media.parquet", media_ids, media),
           "scores": write_scores(tmp_path / "scores.safetensors", ids, media_ids, text @ media.T),
           "pairs": tmp_path / "pairs.tsv"}
    out["pairs"].write_text("text_id\tmedia_id\n" + "".join(f"{i}#0\t{i}\n" for i in ITEMS))
    return out


def _expected(model_files) -> dict:
    from fusion.retrieval.metrics import Relevance, dual_retrieval_metrics

    t, m = load_vectors(str(model_files["text"])), load_vectors(str(model_files["media"]))
    rel = Relevance.from_ids(t.ids, m.ids, [(f"{i}#0", i) for i in ITEMS])
    return dual_retrieval_metrics(t.vectors, m.vectors, rel)


def test_stele_eval_retrieval_scores_precomputed_vectors_and_scores_alike(feature_artifact, model_files,
                                                                          tmp_path, capsys):
    from pipeline.cli import main

    want = _expected(model_files)
    runs = {"vectors": ["--text-vectors", str(model_files["text"]), "--media-vectors",
                        str(model_files["media"]), "--media", str(feature_artifact)],
            "scores": ["--scores", str(model_files["scores"]), "--media", str(feature_artifact)],
            "pairs": ["--text-vectors", str(model_files["text"]), "--media-vectors",
                      str(model_files["media"]), "--pairs", str(model_files["pairs"])]}
    for name, argv in runs.items():
        out = tmp_path / name
        rc = main(["eval", "retrieval", *argv, "--out", str(out)])
        printed = capsys.readouterr().out
        assert rc == 0, printed
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["mode"] == ("all_pairs" if name == "scores" else "dual"), name
        assert metrics["split"] == "the ids in the files"
        for d in ("text_to_media", "media_to_text"):
            assert metrics[d] == pytest.approx(want[d], rel=1e-6), (name, d)
        assert metrics["counts"]["correct_pairs"] == 42 and metrics["counts"]["captions"] == 42
        assert f"R@1 {want['text_to_media']['R@1']:.1f}" in printed
        examples = json.loads((out / "examples.json").read_text())
        first = examples[0]
        assert first["direction"] == "text_to_media" and len(first["results"]) == 5
        if name != "pairs":   # captions' texts come from the media artifact
            assert first["query"]["text"] == "the red dog"
    import pyarrow.parquet as pq

    ranks = pq.read_table(tmp_path / "vectors" / "ranks.parquet").to_pylist()
    assert len(ranks) == 84 and all(len(r["top_ids"]) == 10 for r in ranks)


def _with_own_split(src: Path, dest: Path, test: set[str]) -> Path:
    """A copy of a feature artifact whose items carry a dataset split: ``test`` items, else train."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dest)
    items = pq.read_table(dest / "items.parquet")
    meta = [json.dumps({"split": "test" if i in test else "train"}) for i in items["id"].to_pylist()]
    pq.write_table(items.set_column(items.schema.get_field_index("meta"), "meta",
                                    pa.array(meta, pa.string())), dest / "items.parquet")
    return dest


def test_precomputed_files_narrowed_to_the_datasets_own_split(feature_artifact, model_files, tmp_path,
                                                             capsys):
    """``--split test`` with precomputed vectors or scores: only the files' rows of the media
    artifact's test items (and the texts paired with them) are ranked, as if the files held no more."""
    from fusion.retrieval.metrics import Relevance, dual_retrieval_metrics
    from pipeline.cli import main

    test = {i for i in ITEMS if i.startswith((f"{COLOURS[0]}-", f"{COLOURS[1]}-"))}
    media_dir = _with_own_split(feature_artifact, tmp_path / "own-split", test)
    ids, text, media_ids, media = _vectors()
    ti = [k for k, i in enumerate(ids) if i.split("#")[0] in test]
    mi = [k for k, i in enumerate(media_ids) if i in test]
    want = dual_retrieval_metrics(torch.as_tensor(text[ti]), torch.as_tensor(media[mi]), Relevance.from_ids(
        [ids[k] for k in ti], [media_ids[k] for k in mi], [(f"{i}#0", i) for i in ITEMS]))
    runs = {"vectors": ["--text-vectors", str(model_files["text"]), "--media-vectors", str(model_files["media"])],
            "scores": ["--scores", str(model_files["scores"])]}
    for name, argv in runs.items():
        out = tmp_path / name
        rc = main(["eval", "retrieval", *argv, "--media", str(media_dir), "--split", "test", "--out", str(out)])
        assert rc == 0, capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["split"] == "test"
        c = metrics["counts"]
        assert c["captions"] == c["media"] == len(test) == 2 * len(NOUNS)
        assert c["texts_outside_test"] == c["media_outside_test"] == len(ITEMS) - len(test)
        assert c["dataset_splits"] == {"test": len(test), "train": len(ITEMS) - len(test)}
        for d in ("text_to_media", "media_to_text"):
            assert metrics[d] == pytest.approx(want[d], rel=1e-6), (name, d)
    # a split the dataset does not have names the ones it has
    rc = main(["eval", "retrieval", *runs["scores"], "--media", str(media_dir), "--split", "val",
               "--out", str(tmp_path / "x")])
    assert rc == 1 and "no item of split 'val'" in capsys.readouterr().out


def test_eval_retrieval_external_model_mistakes_are_one_line_errors(feature_artifact, model_files,
                                                                   tmp_path, capsys):
    from pipeline.cli import main

    def err(*argv: str) -> str:
        rc = main(["eval", "retrieval", *argv, "--out", str(tmp_path / "x")])
        printed = capsys.readouterr().out
        assert rc == 1, printed
        return " ".join(printed.split())

    assert "give a model" in err("--media", str(feature_artifact))
    assert "text_vectors and media_vectors go together" in err("--text-vectors", str(model_files["text"]),
                                                               "--media", str(feature_artifact))
    assert "one external model at a time" in err("--scores", str(model_files["scores"]), "--text-vectors",
                                                 str(model_files["text"]), "--media-vectors",
                                                 str(model_files["media"]), "--media", str(feature_artifact))
    assert "mode 'rerank': it needs a cross-encoder" in err("--scores", str(model_files["scores"]), "--mode",
                                                        "rerank", "--media", str(feature_artifact))
    assert "split 'test': the items of features artifact" in err(       # the artifact's carry no split
        "--scores", str(model_files["scores"]), "--split", "test", "--media", str(feature_artifact))
    assert "split 'test' is the dataset's own split: give the media artifact" in err(
        "--scores", str(model_files["scores"]), "--split", "test", "--pairs", str(model_files["pairs"]))
    assert "give input role 'media' (--media)" in err("--scores", str(model_files["scores"]))
    # caption ids that name nothing in the relevance
    ids, text, media_ids, media = _vectors()
    odd = write_vectors(tmp_path / "odd.npy", [f"cap{i}" for i in range(42)], text)
    assert "no (text, media) pair" in err("--text-vectors", str(odd), "--media-vectors",
                                          str(model_files["media"]), "--media", str(feature_artifact))
    wide = write_vectors(tmp_path / "wide.npy", media_ids, np.ones((42, 9), np.float32))
    assert "wide.npy: vectors: 9-d, but the text vectors" in err(
        "--text-vectors", str(model_files["text"]), "--media-vectors", str(wide), "--media",
        str(feature_artifact))


def test_unused_external_fields_leave_old_cache_keys_alone(model_files):
    from fusion.retrieval.stage import RetrievalParams, _fingerprint

    plain = RetrievalParams()
    assert "text_vectors" not in plain.model_dump(mode="json") and _fingerprint(plain) is None
    p = RetrievalParams(text_vectors=str(model_files["text"]), media_vectors=str(model_files["media"]))
    assert p.mode == "dual" and p.split == "all"
    assert p.model_dump()["text_vectors"] == str(model_files["text"])
    before = _fingerprint(p)
    model_files["text"].with_suffix(".ids.txt").write_text(
        model_files["text"].with_suffix(".ids.txt").read_text().replace("red-dog#0", "red-dog#1"))
    assert _fingerprint(p) != before                     # the ids file is part of the model


PIPELINE = """\
name: external
stages:
  eval:
    uses: fusion.retrieval
    with: {{text_vectors: {text}, media_vectors: {media}, pairs: {pairs}, examples: 2}}
"""


def test_a_pipeline_evaluates_precomputed_vectors_and_reruns_when_they_change(ray_local, model_files,
                                                                             tmp_path):
    from rich.console import Console

    from pipeline.runner import plan, run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    text = PIPELINE.format(**{k: str(v) for k, v in model_files.items()})
    store = ArtifactStore(tmp_path / "store")
    result = run(parse_pipeline(text), store, console=Console(record=True, width=200), live=False)
    assert result.outcomes["eval"].status == "ran", result.outcomes["eval"]
    art = store.open(result.outcomes["eval"].key)
    metrics = json.loads((art / "metrics.json").read_text())
    want = _expected(model_files)
    assert metrics["text_to_media"] == pytest.approx(want["text_to_media"], rel=1e-6)
    assert metrics["relevance"] == "pairs pairs.tsv"
    assert plan(parse_pipeline(text), store)["eval"].action == "cached"
    ids, vec, _, _ = _vectors(seed=1)
    write_vectors(model_files["text"], ids, vec)                      # new vectors, same file name
    assert plan(parse_pipeline(text), store)["eval"].action == "run"


def test_media_artifact_items_without_vectors_are_counted(model_files, tmp_path):
    """Relevance from the artifact: captions whose item has no vector are queries without a correct
    item (skipped and counted); pairs naming ids outside the files are counted too."""
    from fusion.retrieval.stage import RetrievalParams, evaluate

    media = make_feature_artifact(tmp_path / "f", captions={"red-dog": ["the red dog", "a red dog"]})
    ids, text, media_ids, mvec = _vectors()
    sub = write_vectors(tmp_path / "m40.npy", media_ids[2:], mvec[2:])   # red-dog, red-cat missing
    m = evaluate(None, media, tmp_path / "out", RetrievalParams(text_vectors=str(model_files["text"]),
                                                                 media_vectors=str(sub)))
    assert m["text_to_media_skipped_no_positive"] == 2 and m["media"] == 40
    counts = json.loads((tmp_path / "out" / "metrics.json").read_text())["counts"]
    assert counts["pairs_with_text_outside"] == 1                    # red-dog#1 has no vector
    assert counts["pairs_with_media_outside"] == 3                   # red-dog#0, red-dog#1, red-cat#0
