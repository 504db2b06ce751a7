"""pipeline.features: the feature-shard writer and reader, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.features import FeatureSet, FeatureWriter, region_schema, region_table


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
