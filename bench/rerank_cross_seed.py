"""A re-ranker on *another* dual encoder's streams: each seed's ``dual`` (``pipelines/emoji_rerank.yaml``)
re-ranked by the next seed's ``reranker`` (its own dual encoder's streams, cross layers and hard
negatives) and by the next seed's cross-fitted ``reranker_cf``, alone and fused (``fuse: zscore``),
beside the ensemble control: the same first stage fused with the next seed's ``dual`` and no cross
layers (:func:`rerank_ensemble_control.control`). Seeds pair as 1 <- 2, 2 <- 3, 3 <- 1.

Needs a store in which ``bench/seeds.py`` ran ``emoji_rerank.yaml`` for the seeds: every training
stage is then cached and only the retrieval stages run. One pipeline per pair is written to
``<store>/cross_seed/`` and run with ``stele``; the table (R@1 in %, text -> image / image -> text,
difference to the first stage) is printed and written to ``<store>/cross_seed/results.json``.

    STELE_DATA=/path/to/data python bench/rerank_cross_seed.py --store /tmp/rr --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
STELE = str(Path(sys.executable).parent / "stele")
EVALS = ("reranker_b_on_dual", "reranker_b_on_dual_fused", "reranker_cf_b_on_dual",
         "reranker_cf_b_on_dual_fused")


def pair_pipeline(a: int, b: int, data: str) -> dict:
    """``emoji_rerank.yaml``'s stages with ``dual`` at seed ``a`` and the re-rankers (with their own
    first stages, renamed ``*_b``) at seed ``b``: the same stage keys as the per-seed runs."""
    text = (ROOT / "pipelines" / "emoji_rerank.yaml").read_text().replace("!data emoji",
                                                                          str(Path(data) / "emoji"))
    st = yaml.safe_load(text)["stages"]

    def seeded(name: str, seed: int, inputs: dict | None = None) -> dict:
        stage = json.loads(json.dumps(st[name]))
        if stage["uses"] == "fusion.pretrain":
            stage["with"]["seed"] = seed
        if inputs is not None:
            stage["inputs"] = inputs
        return stage

    media = {"media": "emoji_images"}
    out = {"emoji_images": st["emoji_images"], "dual": seeded("dual", a), "dual_b": seeded("dual", b),
           "dual_b_train_ranks": seeded("dual_train_ranks", b, {"model": "dual_b", **media}),
           "reranker_b": seeded("reranker", b, {**media, "first_stage": "dual_b",
                                                "negatives": "dual_b_train_ranks"}),
           "dual_half_b": seeded("dual_half", b),
           "dual_half_b_unseen_ranks": seeded("dual_half_unseen_ranks", b, {"model": "dual_half_b", **media}),
           "reranker_cf_b": seeded("reranker_cf", b, {**media, "first_stage": "dual_half_b",
                                                      "negatives": "dual_half_b_unseen_ranks"})}
    for model in ("reranker_b", "reranker_cf_b"):
        for fuse in ("", "_fused"):
            out[f"{model}_on_dual{fuse}"] = {
                "uses": "fusion.retrieval", "inputs": {"model": model, "first_stage": "dual", **media},
                "with": {"mode": "rerank", "k": 16, **({"fuse": "zscore"} if fuse else {})}}
    return {"name": f"emoji_rerank_cross_{a}_{b}", "pools": {"train": 1}, "stages": out}


def r1(metrics: dict) -> tuple[float, float]:
    return metrics["text_to_media"]["R@1"], metrics["media_to_text"]["R@1"]


def main() -> None:
    from pipeline.runner import plan
    from pipeline.spec import load_pipeline
    from pipeline.store import ArtifactStore
    from rerank_ensemble_control import control

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--seeds", default="1,2,3")
    args = ap.parse_args()
    if not os.environ.get("STELE_DATA"):
        sys.exit("set STELE_DATA to the folder holding emoji/")
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = Path(args.store) / "cross_seed"
    folder.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(args.store)
    results: dict[str, dict] = {}
    for a, b in zip(seeds, seeds[1:] + seeds[:1]):
        spec = folder / f"pair_{a}_{b}.yaml"
        spec.write_text(yaml.safe_dump(pair_pipeline(a, b, os.environ["STELE_DATA"]), sort_keys=False))
        subprocess.run([STELE, "run", str(spec), "--store", args.store, "--no-live"], check=True,
                       env=dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1"))
        planned = plan(load_pipeline(str(spec)), store)
        art = {name: store.open(p.key).path for name, p in planned.items()}
        rows = {name: r1(json.loads((art[name] / "metrics.json").read_text())) for name in EVALS}
        ctl = control(args.store, str(art["dual"]), str(art["dual_b"]), str(art["emoji_images"]))
        first, ensemble = (r1(m) for m in list(ctl.values())[::2])
        results[f"{a}<-{b}"] = {"dual": first, **rows, "control_two_duals_fused": ensemble}
    names = ["dual", *EVALS, "control_two_duals_fused"]
    print(f"\nR@1 in %, text -> image / image -> text; seed a's dual re-ranked by seed b's model "
          f"({', '.join(results)}); mean and difference to the dual")
    for name in names:
        cells = [results[p][name] for p in results]
        mean = [statistics.mean(c[i] for c in cells) for i in (0, 1)]
        base = [statistics.mean(results[p]["dual"][i] for p in results) for i in (0, 1)]
        diff = f"{mean[0] - base[0]:+.1f} / {mean[1] - base[1]:+.1f}"
        print(f"{name:30s} " + "  ".join(f"{t:5.1f} / {v:5.1f}" for t, v in cells)
              + f"  | mean {mean[0]:5.1f} / {mean[1]:5.1f} ({diff})")
    (folder / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
