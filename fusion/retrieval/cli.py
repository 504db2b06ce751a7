"""``stele eval retrieval``: the ``fusion.retrieval`` protocol on artifacts named on the command
line, without writing a pipeline.

A ``stele`` subcommand contributed through the ``stele.commands`` entry-point group
(:mod:`pipeline.commands`): ``eval`` with one task, ``retrieval``, whose options are the stage's
parameters."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from fusion.retrieval.scorer import DIRECTIONS
from fusion.retrieval.stage import RetrievalParams, evaluate
from pipeline import StageFailed
from pipeline.commands import command


# ----------------------------------------------------------------------------------- the CLI
@command("eval", help="evaluate artifacts outside a pipeline (retrieval)")
class Eval:
    """``stele eval retrieval ...``: the stage's protocol on existing artifacts, outside a pipeline."""

    def add_arguments(self, parser: Any) -> None:
        tasks = parser.add_subparsers(dest="task", required=True)
        r = tasks.add_parser("retrieval", help="cross-modal retrieval with a fusion.pretrain model")
        r.add_argument("--model", required=True, help="fusion.pretrain artifact (key prefix or folder)")
        r.add_argument("--media", required=True, help="feature artifact to search (key prefix or folder)")
        r.add_argument("--first-stage", help="another fusion.pretrain artifact ranking candidates first")
        r.add_argument("--queries", help="media queries' feature artifact (media_lxmert, media_dual models)")
        r.add_argument("--out", help="output folder (default ./retrieval-<mode>)")
        r.add_argument("--store", help="artifact store for key prefixes "
                       "(default: $STELE_STORE or ./stele-store)")
        fields = RetrievalParams.model_fields
        for name in ("mode", "k", "split", "limit", "batch_size", "workers", "gpus_per_worker", "examples"):
            f = fields[name]
            kind = {"k": int, "limit": int, "batch_size": int, "workers": int, "examples": int,
                    "gpus_per_worker": float}.get(name, str)
            choices = typing.get_args(f.annotation) if typing.get_origin(f.annotation) is Literal else None
            r.add_argument(f"--{name.replace('_', '-')}", type=kind, default=f.default, choices=choices,
                           help=f.description)

    def run(self, args: Any, console: Any) -> int:
        from pipeline.store import ArtifactStore, default_store_uri

        params = RetrievalParams(mode=args.mode, k=args.k, split=args.split, limit=args.limit,
                                 batch_size=args.batch_size, workers=args.workers,
                                 gpus_per_worker=args.gpus_per_worker, examples=args.examples)
        store = ArtifactStore(args.store or default_store_uri())

        def folder(ref: str) -> Path:  # an artifact folder as it is, else a key (prefix) in the store
            p = Path(ref)
            return p if p.is_dir() else Path(store.artifact_path(store.resolve(ref)))

        out = Path(args.out or f"retrieval-{params.mode}")
        if params.workers > 1:
            from pipeline.ray_utils import init_ray

            init_ray()
        try:
            m = evaluate(folder(args.model), folder(args.media), out, params,
                         folder(args.first_stage) if args.first_stage else None,
                         queries_dir=folder(args.queries) if args.queries else None)
        except StageFailed as e:
            console.print(f"[red]error:[/] {e}", highlight=False)
            return 1
        label = params.mode + (f", k={params.k}" if params.mode == "rerank" else "")
        console.print(f"retrieval ({label}) over {m['captions']} captions x {m['media']} media, "
                      f"{m['eval_s']:.1f} s, {m['pairs_scored']} pairs scored")
        for d in DIRECTIONS:
            console.print(f"  {d.replace('_', ' '):>14}: " + "  ".join(
                f"R@{k} {m[f'{d}_R@{k}']:.1f}" for k in (1, 5, 10))
                + f"  median rank {m[f'{d}_median_rank']:.1f}  mAP@10 {m[f'{d}_mAP@10']:.1f}")
        console.print(f"  RSUM {m['rsum']:.1f} (first stage alone {m['first_stage_rsum']:.1f})")
        console.print(f"written to {out}/ (metrics.json, ranks.parquet, recall_at_k.png, rank_hist.png, "
                      f"examples.json)")
        return 0
