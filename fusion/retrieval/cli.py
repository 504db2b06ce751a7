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
from fusion.retrieval.stage import RetrievalParams, RetrievalResult, evaluate
from pipeline import StageFailed
from pipeline.commands import command

# RetrievalParams' fields that are options of `stele eval retrieval`, with their types.
OPTIONS = {"mode": str, "k": int, "split": str, "limit": int, "batch_size": int, "workers": int,
           "gpus_per_worker": float, "examples": int}


def evaluate_artifacts(model: str | Path, media: str | Path, *, first_stage: str | Path | None = None,
                       queries: str | Path | None = None, out: str | Path | None = None,
                       store: Any = None, run: str | None = None, **params: Any) -> RetrievalResult:
    """The ``fusion.retrieval`` protocol on existing artifacts, outside a pipeline: what ``stele eval
    retrieval`` runs. Each artifact is a folder, a stage name (its artifact in the latest run of
    ``store`` that has it, or in ``run``) or a key prefix; ``params`` are
    :class:`~fusion.retrieval.stage.RetrievalParams`. Writes into ``out`` (default
    ``./retrieval-<mode>``); raises :class:`~pipeline.StageFailed` when the protocol cannot run."""
    from pipeline.runs import resolve_artifact
    from pipeline.store import ArtifactStore, default_store_uri

    p = RetrievalParams(**params)
    if not isinstance(store, ArtifactStore):
        store = ArtifactStore(store or default_store_uri())

    def folder(ref: str | Path) -> Path:  # an artifact folder as it is, else a name or key
        if Path(ref).is_dir():
            return Path(ref)
        return store.open(resolve_artifact(store, str(ref), run)[0]).path

    dest = Path(out or f"retrieval-{p.mode}")
    if p.workers > 1:
        from pipeline.ray_utils import init_ray

        init_ray()
    headline = evaluate(folder(model), folder(media), dest, p,
                        folder(first_stage) if first_stage else None,
                        queries_dir=folder(queries) if queries else None)
    return RetrievalResult.load(dest, headline)


# ----------------------------------------------------------------------------------- the CLI
@command("eval", help="evaluate artifacts outside a pipeline (retrieval)")
class Eval:
    """``stele eval retrieval ...``: the stage's protocol on existing artifacts, outside a pipeline."""

    def add_arguments(self, parser: Any) -> None:
        tasks = parser.add_subparsers(dest="task", required=True)
        r = tasks.add_parser("retrieval", help="cross-modal retrieval with a fusion.pretrain model")
        r.add_argument("--model", required=True, help="fusion.pretrain artifact (stage name, key prefix "
                       "or folder)")
        r.add_argument("--media", required=True, help="feature artifact to search (stage name, key "
                       "prefix or folder)")
        r.add_argument("--first-stage", help="another fusion.pretrain artifact ranking candidates first "
                       "(default: the model's own vectors)")
        r.add_argument("--queries", help="media queries' feature artifact (media_lxmert, media_dual models)")
        r.add_argument("--out", help="output folder (default ./retrieval-<mode>)")
        r.add_argument("--store", help="artifact store for stage names and key prefixes "
                       "(default: $STELE_STORE or ./stele-store)")
        r.add_argument("--run", help="take stage names' artifacts from this run (default: the latest "
                       "run that has each)")
        fields = RetrievalParams.model_fields
        for name, kind in OPTIONS.items():
            f = fields[name]
            choices = typing.get_args(f.annotation) if typing.get_origin(f.annotation) is Literal else None
            # stele's help formatter appends each default to the help, so every option has one
            help_ = f.description or name.replace("_", " ")
            if f.default is None:  # (which the formatter leaves out: say what it means here)
                help_ += " (default: all)"
            r.add_argument(f"--{name.replace('_', '-')}", type=kind, default=f.default, choices=choices,
                           help=help_)

    def run(self, args: Any, console: Any) -> int:
        try:
            res = evaluate_artifacts(args.model, args.media, first_stage=args.first_stage,
                                     queries=args.queries, out=args.out, store=args.store, run=args.run,
                                     **{name: getattr(args, name) for name in OPTIONS})
        except StageFailed as e:
            console.print(f"[red]error:[/] {e}", highlight=False)
            return 1
        m, out = res.headline, res.path
        label = m["mode"] + (f", k={m['k']}" if m["mode"] == "rerank" else "")
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
