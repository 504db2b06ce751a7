"""``stele export ARTIFACT --format FORMAT --out DIR``: an artifact written in another library's own
format, so a model trained by stele is used without stele: ``hf`` (a Hugging Face folder that
``transformers.AutoModel.from_pretrained`` loads), ``pykeen`` and ``pyg`` (KG embeddings that
PyKEEN's and PyTorch Geometric's models load with ``load_state_dict``). ARTIFACT is a stage name,
a key prefix or an artifact folder, as ``stele show`` takes it.

Which formats an artifact has depends on the stage type that wrote it, so the command itself knows
no stage type: an *exporter* is one decorated function per stage type, registered like stage types
and commands (:class:`pipeline.registry.Registry`), and packages publish theirs through the
``stele.exporters`` entry-point group (``knowledge.export`` for ``knowledge.embed``,
``fusion.export`` for ``fusion.pretrain``; a plugin's stage type brings its own)::

    from pipeline.export import exporter

    @exporter("acme.embed", formats=("pyg",))
    def export_acme(artifact: Path, fmt: str, out: Path) -> dict:
        ...  # write into out; return {"files": [...], "notes": [...]}

An export is written to a temporary folder beside ``--out`` and renamed into place when complete,
so a failed export leaves no folder that looks finished; an existing non-empty ``--out`` is refused
rather than mixed with older files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .commands import command
from .registry import Registry


class ExportError(ValueError):
    """An artifact that cannot be written in the asked format; the message says why (one line)."""


#: ``(artifact folder, format, output folder) -> {"files": [...], "notes": [...]}``
ExportFn = Callable[[Path, str, Path], dict[str, Any]]


@dataclass(frozen=True)
class Exporter:
    stage_type: str
    formats: tuple[str, ...]
    fn: ExportFn

    @property
    def qualname(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


EXPORTERS: Registry[Exporter] = Registry(group="stele.exporters", kind="exporter",
                                         qualname=lambda e: e.qualname)


def exporter(stage_type: str, *, formats: tuple[str, ...]) -> Callable[[ExportFn], ExportFn]:
    """Register ``fn(artifact, fmt, out)`` as the exporter of ``stage_type``'s artifacts."""
    if not formats:
        raise ValueError(f"exporter of {stage_type!r}: name at least one format")

    def deco(fn: ExportFn) -> ExportFn:
        EXPORTERS.register(stage_type, Exporter(stage_type, tuple(formats), fn))
        return fn

    return deco


def open_artifact(ref: str, store_uri: str | None = None, run: str | None = None
                  ) -> tuple[Path, dict[str, Any]]:
    """``(local folder, manifest)`` of ``ref``: an artifact folder as it is, else a stage name (its
    artifact in the latest run that has it, or in ``run``) or a key prefix, looked up as ``stele
    show`` does (:func:`pipeline.runs.resolve_artifact`); a remote store's artifact is downloaded
    into the local cache."""
    import json

    from pipeline.runs import resolve_artifact
    from pipeline.store import MANIFEST, ArtifactStore, default_store_uri

    p = Path(ref)
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise ExportError(f"{ref}: not a finished artifact (no {MANIFEST})")
        return p, json.loads((p / MANIFEST).read_text())
    store = ArtifactStore(store_uri or default_store_uri())
    art = store.open(resolve_artifact(store, ref, run)[0])
    return art.path, art.manifest


def export(ref: str, fmt: str, out: str | Path, store_uri: str | None = None,
           run: str | None = None) -> dict[str, Any]:
    """Write artifact ``ref`` (:func:`open_artifact`) in format ``fmt`` into the new folder ``out``
    (see the module docstring); returns the exporter's summary plus ``stage_type``."""
    folder, manifest = open_artifact(ref, store_uri, run)
    stage_type = manifest.get("type", "")
    try:
        exp = EXPORTERS.get(stage_type)
    except KeyError as e:
        raise ExportError(f"{ref}: artifacts of stage type {stage_type!r} have no exporter "
                          f"({e.args[0]})") from None
    if fmt not in exp.formats:
        raise ExportError(f"{stage_type} artifacts export as {' or '.join(exp.formats)}, "
                          f"not {fmt!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder: choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        summary = exp.fn(folder, fmt, work)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"stage_type": stage_type, **summary}


@command("export", help="write an artifact for another library: hf (transformers), pykeen, pyg")
class Export:
    """``stele export ARTIFACT --format hf|pykeen|pyg --out DIR [--store S] [--run R]``."""

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("artifact", help="stage name, artifact key (prefix) or folder")
        parser.add_argument("--format", dest="fmt", required=True,
                            help="hf: a fusion.pretrain text encoder as a Hugging Face folder; "
                                 "pykeen / pyg: knowledge.embed embeddings")
        parser.add_argument("--out", required=True, help="new folder to write (must not exist, "
                            "or be empty)")
        parser.add_argument("--store", help="artifact store for stage names and keys "
                            "(default: $STELE_STORE or ./stele-store)")
        parser.add_argument("--run", help="take a stage name's artifact from this run (default: "
                            "the latest run that has it)")

    def run(self, args: Any, console: Any) -> int:
        from rich.markup import escape

        from pipeline.errors import SteleError

        try:
            summary = export(args.artifact, args.fmt, args.out, args.store, args.run)
        except (ExportError, SteleError) as e:
            console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            return 2  # the CLI's "bad input, nothing written"; no folder was left behind
        console.print(f"{summary['stage_type']} -> {args.fmt}: written to {escape(str(args.out))}/ "
                      f"({', '.join(summary.get('files', []))})", highlight=False)
        for note in summary.get("notes", []):
            console.print(f"  {escape(note)}", highlight=False)
        return 0
