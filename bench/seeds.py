"""A retrieval pipeline once per seed, in one store, and each ``fusion.retrieval`` stage's recall as
mean ± standard deviation over the seeds: the "3 seeds" rows of BENCHMARKS.md.

Each seed is one ``stele run`` of the pipeline with ``--set STAGE.seed=S`` for every stage of the
seeded types (``fusion.pretrain`` unless ``--seed-types`` says otherwise); stages that do not
depend on the seed (features, the split) are computed once and reused from the store's cache, so
an interrupted sweep resumes where it stopped by running the same command again.

    STELE_DATA=../shared/data python bench/seeds.py pipelines/emoji_models.yaml \\
        --store /tmp/emoji-models --seeds 1,2,3
    python bench/seeds.py pipelines/kg_retrieval.yaml --store /tmp/kgret --seeds 1,2,3 \\
        --seed-types fusion.pretrain,knowledge.embed --json /tmp/kgret.json

Per seed and stage it prints R@1/5/10 both directions, RSUM and, where a stage re-ranks, its first
stage's RSUM; then a Markdown table of means ± std (population over the seeds run) and, for every
stage with a first stage, the R@1 difference to it. ``--report-only`` prints the table from the
runs already in the store (per seed, the pipeline's latest run: keep one sweep per store). A stage
evaluated on another split than ``test`` (e.g. a ranking of the training items) is labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIRS = ("text_to_media", "media_to_text")
KS = (1, 5, 10)


def stages_of(pipeline_file: str, overrides: list[str], types: set[str]) -> tuple[str, list[str], list[str]]:
    """(the pipeline's name, stages whose type is seeded, ``fusion.retrieval`` stages), in the
    pipeline's order."""
    from pipeline.spec import load_pipeline

    pipe = load_pipeline(pipeline_file, overrides)
    seeded = [n for n, st in pipe.stages.items() if st.type.name in types]
    evals = [n for n, st in pipe.stages.items() if st.type.name == "fusion.retrieval"]
    return pipe.name, seeded, evals


def run_seed(args: argparse.Namespace, seeded: list[str], seed: int) -> str:
    """One ``stele run`` with every seeded stage at ``seed``; returns the run's id."""
    from pipeline.runs import resolve_run
    from pipeline.store import ArtifactStore

    stele = str(Path(sys.executable).parent / "stele")
    cmd = [stele, "run", args.pipeline, "--store", args.store, "--no-live"]
    for s in args.set:
        cmd += ["--set", s]
    for name in seeded:
        cmd += ["--set", f"{name}.seed={seed}"]
    if args.until:
        cmd += ["--until", args.until]
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: stele run failed (exit {proc.returncode})")
    return resolve_run(ArtifactStore(args.store), "latest")["run_id"]


def stage_ref(store_uri: str, run_id: str, stage: str) -> tuple[Any, Any] | None:
    """``(store, the stage's artifact ref)`` in that run, None (with a warning) if the run has no
    artifact for it."""
    from pipeline.errors import StoreError
    from pipeline.runs import find_stage
    from pipeline.store import ArtifactStore

    store = ArtifactStore(store_uri)
    try:
        return store, find_stage(store, stage, run=run_id)
    except StoreError as e:
        print(f"warning: run {run_id}: {e}", flush=True)
        return None


def metrics_of(store_uri: str, run_id: str, stage: str) -> dict | None:
    """The stage's metrics.json in that run, None if the run has no artifact for it."""
    found = stage_ref(store_uri, run_id, stage)
    if found is None:
        return None
    store, ref = found
    return json.loads((store.open(ref.key).path / "metrics.json").read_text())


def row(m: dict) -> dict[str, float]:
    """Flat figures of one evaluation: R@k per direction, RSUM, the first stage's where it has one."""
    out = {f"{d}_R@{k}": m[d][f"R@{k}"] for d in DIRS for k in KS}
    out["rsum"] = m["rsum"]
    out["split"] = m.get("split", "test")
    if m.get("mode") == "rerank":  # a dual-mode evaluation is its own first stage
        out.update({f"first_{d}_R@1": m[f"first_stage_{d}"]["R@1"] for d in DIRS})
        out["first_rsum"] = m["first_stage_rsum"]
    return out


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def table(per_stage: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| stage | seeds | text -> media R@1 / R@5 / R@10 | media -> text R@1 / R@5 / R@10 | RSUM "
             "| R@1 vs its first stage (both directions) |", "|---|---|---|---|---|---|"]
    for stage, rows in per_stage.items():
        if not rows:
            continue
        cols = [" / ".join(mean_std([r[f"{d}_R@{k}"] for r in rows]) for k in KS) for d in DIRS]
        delta = ""
        if all("first_rsum" in r for r in rows):
            delta = " / ".join(
                f"{statistics.mean(r[f'{d}_R@1'] - r[f'first_{d}_R@1'] for r in rows):+.1f}" for d in DIRS)
        splits = sorted({r["split"] for r in rows})
        split = ("" if splits == ["test"] else
                 f" (split {', '.join(splits)}{': training items' if splits == ['train'] else ''})")
        lines.append(f"| `{stage}`{split} | {len(rows)} | {cols[0]} | {cols[1]} | "
                     f"{mean_std([r['rsum'] for r in rows])} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--store", required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--seed-types", default="fusion.pretrain",
                    help="comma-separated stage types whose 'seed' is set to each seed")
    ap.add_argument("--set", action="append", default=[], help="passed on to stele run")
    ap.add_argument("--until", default=None, help="passed on to stele run")
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: the table from the latest run of each seed already in the store")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    name, seeded, evals = stages_of(args.pipeline, args.set, set(args.seed_types.split(",")))
    if not seeded:
        raise SystemExit(f"no stage of type {args.seed_types} in {args.pipeline}: nothing to seed")
    runs = ({s: latest_run_of_seed(args.store, name, seeded[0], s) for s in seeds} if args.report_only
            else {s: run_seed(args, seeded, s) for s in seeds})
    per_stage: dict[str, list[dict[str, float]]] = {e: [] for e in evals}
    for seed, run_id in runs.items():
        for e in evals:
            m = metrics_of(args.store, run_id, e)
            if m is None:
                continue
            r = {"seed": seed, **row(m)}
            per_stage[e].append(r)
            first = f" (first stage RSUM {r['first_rsum']:.1f})" if "first_rsum" in r else ""
            print(f"seed {seed} {e}: R@1/5/10 " + " | ".join(
                " / ".join(f"{r[f'{d}_R@{k}']:.1f}" for k in KS) for d in DIRS)
                + f" RSUM {r['rsum']:.1f}{first}", flush=True)
    print(table(per_stage))
    if args.json:
        Path(args.json).write_text(json.dumps({"pipeline": args.pipeline, "seeds": seeds,
                                               "runs": runs, "stages": per_stage}, indent=1))


def latest_run_of_seed(store_uri: str, pipeline: str, stage: str, seed: int) -> str:
    """The latest run of ``pipeline`` (its name) in the store whose ``stage`` ran (or was reused)
    with ``seed``. Runs with other ``--set`` values are not told apart: one sweep per store."""
    from pipeline.runs import list_runs, read_run
    from pipeline.store import ArtifactStore

    store = ArtifactStore(store_uri)
    for rid in reversed(list_runs(store)):
        rec = read_run(store, rid)
        if rec.get("pipeline") != pipeline:
            continue
        o = rec.get("stages", {}).get(stage, {})
        if o.get("key") and o.get("status") in ("ran", "cached"):
            if store.manifest(o["key"]).get("params", {}).get("seed", 0) == seed:
                return rid
    raise SystemExit(f"no run in {store_uri} with {stage}.seed = {seed}")


if __name__ == "__main__":
    main()
