"""``stele eval retrieval``: the ``fusion.retrieval`` protocol on artifacts named on the command
line, without writing a pipeline.

A ``stele`` subcommand contributed through the ``stele.commands`` entry-point group
(:mod:`pipeline.commands`): ``eval`` with one task, ``retrieval``, whose options are the stage's
parameters."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from fusion.retrieval.scorer import DIRECTIONS
from pydantic import ValidationError

from fusion.retrieval.stage import RetrievalParams, RetrievalResult, evaluate, external_kind
from pipeline import StageFailed
from pipeline.commands import command

# RetrievalParams' fields that are options of `stele eval retrieval`, with their types.
OPTIONS = {"mode": str, "k": int, "fuse": str, "split": str, "limit": int, "batch_size": int,
           "workers": int, "gpus_per_worker": float, "examples": int}
# ... and the files of a model from elsewhere (fusion.retrieval.external), paths as given.
EXTERNAL = {"text_vectors": "precomputed text vectors: NAME.npy (+ NAME.ids.txt), .safetensors (tensor "
                            "'vectors', metadata 'ids') or .parquet (id, vector); with --media-vectors, "
                            "instead of --model",
            "media_vectors": "precomputed media vectors, in the same formats",
            "scores": "a precomputed texts x media score matrix: NAME.npy (+ NAME.text_ids.txt, "
                      "NAME.media_ids.txt), .safetensors (tensor 'scores', metadata 'text_ids', "
                      "'media_ids') or .parquet (text_id, media_id, score)",
            "hf_model": "a local Hugging Face folder with a CLIPModel (or any model with get_text_features/"
                        "get_image_features), its tokenizer and image processor: a dual encoder on the "
                        "media artifact's raw images; or with LxmertForPreTraining / "
                        "VisualBertForPreTraining: a cross-encoder on its regions (all_pairs, or rerank "
                        "after --text-vectors/--media-vectors or --first-stage). Nothing is downloaded",
            "pairs": "which text ids belong to which media ids, .parquet or .tsv with columns text_id, "
                     "media_id (default: the --media artifact's captions, ids <item id>#<k>)"}


class _Given(argparse.Action):
    """Stores the value and notes that the option was given, so that a default the user did not
    choose (``--mode``) can give way to the one an external model implies."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def evaluate_artifacts(model: str | Path | None = None, media: str | Path | None = None, *,
                       first_stage: str | Path | None = None,
                       queries: str | Path | None = None, out: str | Path | None = None,
                       store: Any = None, run: str | None = None, **params: Any) -> RetrievalResult:
    """The ``fusion.retrieval`` protocol on existing artifacts, outside a pipeline: what ``stele eval
    retrieval`` runs. Each artifact is a folder, a stage name (its artifact in the latest run of
    ``store`` that has it, or in ``run``) or a key prefix; ``params`` are
    :class:`~fusion.retrieval.stage.RetrievalParams`. Writes into ``out`` (default
    ``./retrieval-<mode>``); raises :class:`~pipeline.StageFailed` when the protocol cannot run."""
    from pipeline.runs import resolve_artifact
    from pipeline.store import ArtifactStore, default_store_uri

    try:
        p = RetrievalParams(**params)
    except ValidationError as e:  # the external-model checks: one line each
        raise StageFailed("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
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
    if model is not None and external_kind(p) is not None:
        raise StageFailed(f"--model and --{external_kind(p).replace('_', '-')} both name the model: give one")
    headline = evaluate(folder(model) if model else None, folder(media) if media else None, dest, p,
                        folder(first_stage) if first_stage else None,
                        queries_dir=folder(queries) if queries else None)
    return RetrievalResult.load(dest, headline)


# ----------------------------------------------------------------------------------- the CLI
@command("eval", help="evaluate artifacts outside a pipeline (retrieval)")
class Eval:
    """``stele eval retrieval ...``: the stage's protocol on existing artifacts, outside a pipeline."""

    def add_arguments(self, parser: Any) -> None:
        tasks = parser.add_subparsers(dest="task", required=True)
        r = tasks.add_parser("retrieval", help="cross-modal retrieval with a fusion.pretrain model, "
                             "precomputed vectors or scores, or a local Hugging Face dual encoder")
        r.add_argument("--model", help="fusion.pretrain artifact (stage name, key prefix or folder); or "
                       "one of --text-vectors/--media-vectors, --scores, --hf-model")
        r.add_argument("--media", help="feature artifact to search (stage name, key prefix or folder); "
                       "with precomputed vectors or scores, where their captions come from")
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
            if name in ("mode", "split"):  # unless given, a model from elsewhere implies its own
                help_ += ("; a model from elsewhere: the mode it implies (dual; a score matrix: all_pairs; "
                          "a cross-encoder: all_pairs, rerank with vectors)" if name == "mode" else
                          "; precomputed vectors or scores: all (the ids in their files), or the media "
                          "artifact's own split")
            r.add_argument(f"--{name.replace('_', '-')}", type=kind, default=f.default, choices=choices,
                           help=help_, action=_Given)
        for name, help_ in EXTERNAL.items():
            r.add_argument(f"--{name.replace('_', '-')}", help=help_)

    def run(self, args: Any, console: Any) -> int:
        try:
            external = {name: getattr(args, name) for name in EXTERNAL if getattr(args, name)}
            given = getattr(args, "given", set())
            # An external model implies its mode (and, for precomputed files, split 'all') unless
            # the option was given; the others are passed as always.
            options = {name: getattr(args, name) for name in OPTIONS
                       if name in given or not external or name not in ("mode", "split")}
            if args.model is None and not external:
                raise StageFailed("give a model: --model, --text-vectors with --media-vectors, --scores "
                                  "or --hf-model")
            res = evaluate_artifacts(args.model, args.media, first_stage=args.first_stage,
                                     queries=args.queries, out=args.out, store=args.store, run=args.run,
                                     **options, **external)
        except StageFailed as e:
            console.print(f"[red]error:[/] {e}", highlight=False)
            return 1
        m, out = res.headline, res.path
        label = m["mode"] + (f", k={m['k']}, fuse={m.get('fuse') or 'none'}" if m["mode"] == "rerank" else "")
        if res.metrics.get("model"):
            label += f", {res.metrics['model']}"
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
