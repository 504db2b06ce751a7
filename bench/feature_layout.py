"""Feature-shard layout: stele's per-item blobs against nested float lists (Arrow's natural
``list<fixed_size_list<float16, dim>>``), written and read back with the same Parquet settings, in one
run.

One stage process writes what every actor computes (``pipeline.raydata``), so the cost of encoding a
batch caps the whole stage's rate; training reads every shard each epoch. Two batch shapes from the
stages' defaults: 64 clips of 3 s (303 log-mel frames of 80 incl. the global one) and 32 images in
grid mode (50 regions of 1,280: tf_efficientnet_lite0's 7x7 cells and the pooled vector).

* ``nested``  features and boxes as ``list<fixed_size_list<...>>`` columns, read back with
  ``flatten()`` and offsets (the layout before session 11); the same float16 conversion and the
  same reader (``pyarrow.dataset``) as stele's, so that only the layout differs.
* ``stele``   :func:`pipeline.features.region_table` -> :class:`~pipeline.features.FeatureWriter`
  -> :class:`~pipeline.features.FeatureSet`, as the stages and the fusion encoders do.

Both write files into a temporary folder (page cache; the disk's own speed is not measured) and
read every item back as numpy arrays; the values are checked equal.

    python bench/feature_layout.py [--batches 8] [--repeats 9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.features import FeatureSet, FeatureWriter, _half, region_schema, region_table

SHAPES = {"clips (64 x 303 x 80)": (64, 303, 80), "images (32 x 50 x 1280)": (32, 50, 1280)}


def _rows(batch: int, regions: int, dim: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    # ReLU-like values with exact zeros, as real feature maps have (compression sees them).
    return [{"id": f"{seed}-{i}", "error": None,
             "features": np.maximum(rng.standard_normal((regions, dim)), 0).astype(np.float32),
             "boxes": rng.random((regions, 4)).astype(np.float32)} for i in range(batch)]


def nested_table(rows: list[dict], dim: int) -> pa.Table:
    counts = [len(r["features"]) for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    f = _half(np.concatenate([r["features"] for r in rows]).reshape(-1))  # stele's conversion
    b = np.concatenate([r["boxes"] for r in rows]).reshape(-1)
    return pa.table({
        "id": [r["id"] for r in rows], "n_regions": pa.array(counts, pa.int32()),
        "features": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(
            pa.array(f, pa.float16()), dim)),
        "boxes": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(
            pa.array(b, pa.float32()), 4))})


def run_nested(batches: list[list[dict]], dim: int, out: Path) -> tuple[float, float, dict]:
    t = time.perf_counter()
    with pq.ParquetWriter(out / "nested.parquet", nested_table(batches[0], dim).schema,
                          use_dictionary=False, write_statistics=["id", "n_regions"]) as w:
        for rows in batches:
            w.write_table(nested_table(rows, dim))
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    got = {}
    for batch in ds.dataset(out / "nested.parquet", format="parquet").to_batches(
            columns=["id", "features", "boxes"], use_threads=False):  # as FeatureSet reads
        feats = batch.column("features")
        f_all = feats.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        b_all = batch.column("boxes").flatten().flatten().to_numpy(
            zero_copy_only=False).reshape(-1, 4)
        off = feats.offsets.to_numpy()
        off = off - off[0]
        for k, i in enumerate(batch.column("id").to_pylist()):
            got[i] = (f_all[off[k]:off[k + 1]], b_all[off[k]:off[k + 1]])
    return t_write, time.perf_counter() - t, got


def run_stele(batches: list[list[dict]], dim: int, out: Path) -> tuple[float, float, dict]:
    schema = region_schema(dim)
    t = time.perf_counter()
    w = FeatureWriter(out, rows_per_shard=1 << 30)
    for rows in batches:
        w.add(region_table(schema, rows))
    w.close()
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    got = {i: (f, b) for i, f, b in FeatureSet(out)}
    return t_write, time.perf_counter() - t, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="batches per file")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    print(f"{'batch':24} {'layout':7} {'write ms/batch':>15} {'read ms/batch':>14} {'MB/batch':>9}")
    for name, (batch, regions, dim) in SHAPES.items():
        batches = [_rows(batch, regions, dim, s) for s in range(args.batches)]
        res = {}
        for layout, fn in (("nested", run_nested), ("stele", run_stele)):
            writes, reads = [], []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    tw, tr, got = fn(batches, dim, Path(tmp))
                    size = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet"))
                writes.append(tw / args.batches)
                reads.append(tr / args.batches)
            for rows in batches:  # same values back, bit for bit
                for r in rows:
                    f, b = got[r["id"]]
                    assert np.array_equal(f, r["features"].astype(np.float16))
                    assert np.array_equal(b, r["boxes"])
            res[layout] = (median(writes) * 1e3, median(reads) * 1e3)
            print(f"{name:24} {layout:7} {res[layout][0]:15.1f} {res[layout][1]:14.1f} "
                  f"{size / args.batches / 1e6:9.2f}")
        print(f"{'':24} {'ratio':7} {res['nested'][0] / res['stele'][0]:14.1f}x "
              f"{res['nested'][1] / res['stele'][1]:13.1f}x   (nested / stele)")


if __name__ == "__main__":
    main()
