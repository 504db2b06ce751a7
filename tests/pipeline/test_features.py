"""pipeline.features: the feature-shard writer and reader (without Ray), and what ``extract`` learns
from its actors and says when they fail (on Ray, with stand-in featurizers)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import StageFailed
from pipeline.feature_stage import FeatureStageParams, extract
from pipeline.features import FeatureSet, FeatureWriter, region_schema, region_table, tensor_spec, unpack_rows


def _rows(ids: list[str], dim: int = 6) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k, i in enumerate(ids):
        if i.startswith("bad"):
            rows.append({"id": i, "error": "cannot decode"})
        else:
            n = 1 + k % 3
            rows.append({"id": i, "features": rng.standard_normal((n, dim)),
                         "boxes": rng.random((n, 4)), "error": None})
    return rows


def test_writer_splits_shards_records_failures_and_round_trips(tmp_path) -> None:
    schema = region_schema(6)
    w = FeatureWriter(tmp_path, rows_per_shard=3)
    batches = [["a", "bad1", "b", "c"], ["d", "e", "bad2"], ["f"]]
    written = {}
    for ids in batches:
        rows = _rows(ids)
        w.add(region_table(schema, rows))
        written.update({r["id"]: r for r in rows if r["error"] is None})
    w.close()
    (tmp_path / "manifest.json").write_text("{}")

    assert w.items == 6 and w.shards == 2 and w.rejected_by_reason == {"cannot decode": 2}
    assert w.regions == sum(len(r["features"]) for r in written.values())
    fs = FeatureSet(tmp_path)
    assert [pq.read_metadata(s).num_rows for s in fs.shards] == [3, 3]
    got = fs.load()
    assert sorted(got) == sorted(written)
    for i, (feats, boxes) in got.items():
        np.testing.assert_array_equal(feats, written[i]["features"].astype(np.float16))
        np.testing.assert_allclose(boxes, written[i]["boxes"], rtol=1e-6)
    assert sorted(fs.rejected()["id"].to_pylist()) == ["bad1", "bad2"]


def test_rejected_reasons_read_the_same_on_every_run(tmp_path) -> None:
    """PIL names the stream it could not read with its memory address; counted by reason, every
    bad image was a reason of its own, and the counts differed from run to run."""
    import io

    from PIL import Image, UnidentifiedImageError

    reasons, streams = [], [io.BytesIO(b"not an image") for _ in range(2)]  # both alive: 2 addresses
    for stream in streams:
        try:
            Image.open(stream)
        except UnidentifiedImageError as e:
            reasons.append(str(e))
    assert reasons[0] != reasons[1]  # what a reader hands the writer
    w = FeatureWriter(tmp_path)
    w.reject([{"id": f"x{i}", "where": f"x{i}.png", "kind": "media", "reason": r}
              for i, r in enumerate(reasons)])
    w.close()
    assert w.rejected_by_reason == {"cannot identify image file <_io.BytesIO object>": 2}
    assert set(FeatureSet(tmp_path).rejected()["reason"].to_pylist()) == set(w.rejected_by_reason)


def test_tensor_columns_are_blobs_that_say_what_they_hold(tmp_path) -> None:
    """One little-endian blob per item, dtype and width in the field metadata (it survives
    Parquet); a failed row has an empty blob; a sliced batch reads back right."""
    t = region_table(region_schema(6), _rows(["a", "bad", "b", "c"]))
    assert t.schema.field("features").type == pa.large_binary()
    assert tensor_spec(t.schema.field("features")) == (np.dtype("<f2"), 6)
    assert tensor_spec(t.schema.field("boxes")) == (np.dtype("<f4"), 4)
    assert t["features"].to_pylist()[1] == b"" and t["n_regions"].to_pylist() == [1, 0, 3, 1]
    pq.write_table(t, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert tensor_spec(back.schema.field("features")) == (np.dtype("<f2"), 6)
    feats = unpack_rows(back["features"].combine_chunks().slice(2), np.dtype("<f2"), 6)
    want = [r["features"].astype(np.float16) for r in _rows(["a", "bad", "b", "c"])[2:]]
    assert [f.shape for f in feats] == [(3, 6), (1, 6)]
    for f, w in zip(feats, want):
        np.testing.assert_array_equal(f, w)


def test_reading_a_shard_of_another_layout_or_a_torn_blob_fails_clearly(tmp_path) -> None:
    (tmp_path / "features").mkdir()
    shard = tmp_path / "features" / "part-00000.parquet"
    nested = pa.table({"id": ["a"], "n_regions": pa.array([1], pa.int32()),
                       "features": pa.array([[[0.5] * 6]], pa.list_(pa.list_(pa.float16(), 6))),
                       "boxes": pa.array([[[0.0] * 4]], pa.list_(pa.list_(pa.float32(), 4)))})
    pq.write_table(nested, shard)
    with pytest.raises(ValueError, match=r"part-00000.parquet: column 'features' .* older stele"):
        list(FeatureSet(tmp_path))
    t = region_table(region_schema(6), _rows(["a", "b"]))
    t = t.set_column(1, "n_regions", pa.array([1, 5], pa.int32()))  # b has 2 regions
    pq.write_table(t.drop_columns(["error"]), shard)
    with pytest.raises(ValueError, match=r"item 'b' has n_regions 5 but 2 feature and 2 box rows"):
        list(FeatureSet(tmp_path))
    with pytest.raises(ValueError, match="not a whole number of 6-wide float16 rows"):
        unpack_rows(pa.array([b"\0" * 10], pa.large_binary()), np.dtype("<f2"), 6)


@pytest.mark.parametrize("cores, gpus, per_actor, want", [
    (2, 0, None, (2, 0, "cpu", 1)),      # two 1-thread actors on 2 cores
    (1, 0, None, (1, 0, "cpu", 1)),
    (64, 0, None, (8, 0, "cpu", 8)),     # at most 8 on CPU, with more threads each
    (16, 4, None, (4, 1.0, "cuda", 4)),  # one per GPU
    (16, 2, 0.5, (4, 0.5, "cuda", 4)),   # two per GPU
])
def test_actors_auto_fills_the_gpus_or_shares_the_cores(monkeypatch, tmp_path, cores, gpus,
                                                        per_actor, want) -> None:
    import pipeline.raydata

    monkeypatch.setattr(pipeline.raydata, "cluster_gpus", lambda: float(gpus))
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    (tmp_path / "c.csv").write_text("image,caption\n")
    spec = {"dataset": {"type": "image_folder", "captions": str(tmp_path / "c.csv")},
            "gpus_per_actor": per_actor}
    params = FeatureStageParams.model_validate(spec)
    assert params.actors == "auto" and params.placement() == want
    assert FeatureStageParams.model_validate({**spec, "actors": 3}).placement()[0] == 3
    with pytest.raises(ValueError, match="actors must be at least 1"):
        FeatureStageParams.model_validate({**spec, "actors": 0})
    # threads: a number the user gives wins over the share of the cores
    assert FeatureStageParams.model_validate({**spec, "threads": 1}).placement() == (*want[:3], 1)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        FeatureStageParams.model_validate({**spec, "threads": 0})


def test_feature_values_carry_no_parquet_statistics(tmp_path) -> None:
    """Min/max of feature and box values serve no reader and cost a third of the write time; the
    id column keeps its statistics."""
    w = FeatureWriter(tmp_path)
    w.add(region_table(region_schema(6), _rows(["a", "b"])))
    w.close()
    md = pq.read_metadata(tmp_path / "features" / "part-00000.parquet").row_group(0)
    stats = {md.column(j).path_in_schema.split(".")[0]: md.column(j).is_stats_set
             for j in range(md.num_columns)}
    assert stats == {"id": True, "n_regions": True, "features": False, "boxes": False}


class Describing:
    """A stand-in featurizer: 3-d features for every item, and a description of itself."""

    def __init__(self, params: FeatureStageParams, device: str, threads: int) -> None:
        self.schema = region_schema(3, describe={"weights": "w.safetensors",
                                                 "warnings": ["the weights are a stand-in"]})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return region_table(self.schema, [{"id": i, "features": np.ones((2, 3)),
                                           "boxes": np.zeros((2, 4)), "error": None}
                                          for i in batch["id"].to_pylist()])


class RejectingOdd:
    """A stand-in featurizer that cannot decode the odd-numbered items."""

    def __init__(self, params: FeatureStageParams, device: str, threads: int) -> None:
        self.schema = region_schema(3, describe={})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return region_table(self.schema, [
            {"id": i, "error": "cannot decode"} if int(i[0]) % 2 else
            {"id": i, "features": np.ones((2, 3)), "boxes": np.zeros((2, 4)), "error": None}
            for i in batch["id"].to_pylist()])


class Broken:
    """A stand-in featurizer that cannot be built, as an actor with a bad weights file."""

    def __init__(self, params: FeatureStageParams, device: str, threads: int) -> None:
        raise ValueError("stand-in model cannot load")


def _extract(tmp_path, actor_cls, explain=None, extra_captions=""):
    from pipeline.context import StageContext
    from pipeline.registry import Resources

    for k in range(5):
        (tmp_path / f"{k}.png").write_bytes(b"not read by the stand-ins")
    (tmp_path / "c.csv").write_text("image,caption\n" + "".join(f"{k}.png,item {k}\n"
                                                                for k in range(5)) + extra_captions)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="f", key="k", out=out, inputs={}, resources=Resources(),
                       state_uri=str(tmp_path / "state"), log=logging.getLogger("test.extract"))
    params = FeatureStageParams.model_validate(
        {"dataset": {"type": "image_folder", "captions": str(tmp_path / "c.csv")}, "batch_size": 2})
    return extract(ctx, params, actor_cls, stage_type="test.features", desc="items",
                   explain=explain), out


def test_extract_learns_what_the_actors_built_from_their_output(ray_local, tmp_path, caplog):
    """The description rides on every output table: the stage gets it with the first batch and
    logs its warnings, without building anything itself; the shards do not carry it."""
    built_here = []
    with caplog.at_level(logging.WARNING, logger="test.extract"):
        counts, out = _extract(tmp_path, Describing, explain=lambda: built_here.append(1))
    assert counts["items"] == 5 and not built_here
    assert counts["described"] == {"dim": 3, "weights": "w.safetensors",
                                   "warnings": ["the weights are a stand-in"]}
    assert "the weights are a stand-in" in caplog.text
    assert pq.read_schema(out / "features" / "part-00000.parquet").metadata is None
    # the tensor columns' own metadata came through Ray Data and Parquet: the set reads back
    got = FeatureSet(out).load()
    assert len(got) == 5 and all(f.shape == (2, 3) and (f == 1).all() for f, _ in got.values())


def test_rejected_counts_items_and_rows_apart(ray_local, tmp_path):
    """An item whose media fails and whose second caption is empty has two rejected rows: the
    manifest's ``rejected`` counts it once, ``rejected_rows`` and the reasons count rows."""
    counts, out = _extract(tmp_path, RejectingOdd, extra_captions='1.png,""\n4.png,""\n')
    assert FeatureSet(out).rejected().num_rows == 4  # 1.png twice, 3.png, 4.png's empty caption
    assert counts["items"] == 3
    assert counts["rejected"] == 3 and counts["rejected_rows"] == 4
    assert counts["rejected_by_kind"] == {"media": 2, "text": 2}
    assert counts["rejected_by_reason"] == {"cannot decode": 2, "empty text": 2}


def test_an_actor_that_cannot_start_fails_in_the_stages_words(ray_local, tmp_path):
    """When the actors die building their model, ``explain`` builds it in the stage's process and
    its error is the one raised; nothing is written."""
    def explain():
        raise StageFailed("test.features: weights w.safetensors do not fit")

    with pytest.raises(StageFailed, match="do not fit") as e:
        _extract(tmp_path, Broken, explain=explain)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # not chained to Ray's report
    assert not list((tmp_path / "out" / "features").glob("*.parquet"))


def test_an_actor_failure_explain_cannot_reproduce_is_reported_as_ray_saw_it(ray_local, tmp_path):
    """A model that builds here (the failure was not the model's) leaves Ray's error standing."""
    import ray.exceptions

    with pytest.raises(ray.exceptions.RayError, match="stand-in model cannot load"):
        _extract(tmp_path, Broken, explain=lambda: None)


def test_float16_conversion_matches_numpy_bit_for_bit() -> None:
    """The feature column is converted by torch (vectorised); it must round as numpy does,
    including overflow to inf, NaN, subnormals and halfway cases."""
    import warnings

    f = (np.random.default_rng(1).standard_normal((5, 6)) * 3e4).astype(np.float32)
    f[0] = [7e4, -7e4, np.nan, 1e-7, 65519.99, 2049.0]  # 2049: halfway, rounds to even
    t = region_table(region_schema(6), [{"id": "a", "features": f, "boxes": np.zeros((5, 4)),
                                         "error": None}])
    [got] = unpack_rows(t["features"].combine_chunks(), np.dtype(np.float16), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on the overflow it performs
        want = f.astype(np.float16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
