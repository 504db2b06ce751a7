"""stele from Python: run a pipeline, load what its stages made by their names, evaluate retrieval.

    import stele

    result = stele.run("pipelines/demo.yaml", store="/tmp/demo", set={"kinships_rotate.dim": 128})
    result.outcomes["kinships_eval"].metrics   # per stage: status, key, metrics, wall_s
    kg = stele.load("/tmp/demo", "kinships")  # what the stage type's loader gives: a KnowledgeGraph

The same engine as the ``stele`` command, through the same functions: :func:`run` is ``stele run``
(:func:`pipeline.runs.start_run`), :func:`load` resolves a stage name as ``stele show`` does
(:mod:`pipeline.runs`) and hands the artifact to its stage type's ``loader``, and
:func:`evaluate_retrieval` is ``stele eval retrieval``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline import (Artifact, ArtifactStore, Input, SpecError, StageContext, StageFailed, SteleError,
                      StoreError, stage)
from pipeline.runner import Outcome, RunResult
from pipeline.runs import StageRef, find_stage, list_runs, read_run, resolve_run

if TYPE_CHECKING:
    from fusion.retrieval.stage import RetrievalResult
    from pipeline.spec import Pipeline

__all__ = ["Artifact", "ArtifactStore", "Input", "Outcome", "RunResult", "SpecError", "StageContext",
           "StageFailed", "StageRef", "SteleError", "StoreError", "__version__", "evaluate_retrieval",
           "find_stage", "list_runs", "load", "read_run", "resolve_run", "run", "stage"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stele")
    except PackageNotFoundError:
        return "unknown"


__version__ = _version()


def _store(store: str | os.PathLike | ArtifactStore | None, spec_store: str | None = None) -> ArtifactStore:
    from pipeline.store import default_store_uri

    if isinstance(store, ArtifactStore):
        return store
    return ArtifactStore(store or default_store_uri(spec_store))


def run(pipeline: str | os.PathLike | Pipeline, *, store: str | os.PathLike | ArtifactStore | None = None,
        set: Mapping[str, Any] | None = None, force: Iterable[str] = (),  # noqa: A002 - `--set`
        until: str | None = None, verify: bool = False, pools: Mapping[str, int] | None = None,
        address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
        report: bool = True, mlflow: str | bool | None = None) -> RunResult:
    """Run a pipeline as ``stele run`` does; returns the :class:`~pipeline.runner.RunResult`
    (``outcomes[stage]``: status, key, metrics, wall_s; ``ok``; ``wall_s`` of the whole run).

    ``pipeline``: a YAML file (or a parsed :class:`~pipeline.spec.Pipeline`). ``store``: a folder,
    URI or store (default ``$STELE_STORE``, the pipeline's ``store:``, ``./stele-store``).
    ``set``: ``{"stage.param": value}``, values taken as they are (not read as YAML). ``force``,
    ``until``, ``verify``, ``pools`` (``{"train": 2}``), ``address``, ``num_cpus``: as the options
    of ``stele run``; Ray is started (or joined) only when something is to run. ``mlflow``: log
    training stages to MLflow (a tracking URI, or True for the default), as ``--mlflow``. ``quiet``: print
    nothing; else progress and the summary, as the command. ``report``: write the HTML report.
    A bad spec raises :class:`SpecError` before anything runs; a failed stage does not raise
    (``result.ok`` is False and its outcome has the error)."""
    from rich.console import Console

    from pipeline.runner import print_summary
    from pipeline.runs import start_run
    from pipeline.spec import Pipeline, load_pipeline, with_pools

    if isinstance(pipeline, Pipeline):
        if set:
            raise ValueError("set= applies to a pipeline file; a parsed Pipeline already has its values")
        spec = pipeline
    else:
        spec = load_pipeline(pipeline, dict(set or {}))
    if pools:
        spec = with_pools(spec, [f"{name}={n}" for name, n in pools.items()])
    st = _store(store, spec.store)
    console = Console(soft_wrap=True, emoji=False, quiet=quiet)
    result = start_run(spec, st, force=list(force), until=until, verify=verify, address=address,
                       num_cpus=num_cpus, console=console, live=False if quiet else None,
                       mlflow=mlflow)
    print_summary(result, console)
    if report:
        from pipeline.report import report_after_run

        report_after_run(st, result.run_id, console)
    return result


def load(store: str | os.PathLike | ArtifactStore | None, name: str, *, run: str | None = None) -> Any:
    """The artifact of stage ``name`` (in the latest run of ``store`` that made or reused it, or
    in ``run``; a key, a key prefix or an artifact folder work too), as the object its stage type's
    ``loader`` gives: a ``knowledge.ingest`` artifact is a KnowledgeGraph, a feature artifact a
    FeatureSet, and so on. A type that declares no loader gives the
    :class:`~pipeline.store.Artifact` (its folder and manifest), with a warning saying so."""
    from pipeline.registry import REGISTRY
    from pipeline.runs import resolve_artifact

    st = _store(store)
    key, _ = resolve_artifact(st, str(name), run)
    art = st.open(key)
    type_name = art.manifest.get("type", "")
    try:
        loader = REGISTRY.get(type_name).loader
        why = f"stage type {type_name!r} declares no loader"
    except KeyError:  # a record of a type whose package is not installed here
        loader, why = None, f"stage type {type_name!r} is not installed"
    if loader is None:
        warnings.warn(f"stele.load({name!r}): {why}; returning its Artifact (files in {art.path})",
                      stacklevel=2)
        return art
    return loader(art.path)


def evaluate_retrieval(model: str | os.PathLike | None = None, media: str | os.PathLike | None = None, *,
                       store: str | os.PathLike | ArtifactStore | None = None,
                       first_stage: str | os.PathLike | None = None,
                       queries: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                       run: str | None = None, **params: Any) -> RetrievalResult:
    """``stele eval retrieval``: the ``fusion.retrieval`` protocol on existing artifacts (stage
    names, key prefixes or folders), written to ``out`` (default ``./retrieval-<mode>``).
    ``params`` are the stage's (``mode="rerank"``, ``k=32``, ``split="test"``, ...; a model from
    elsewhere instead of ``model``: ``text_vectors=`` + ``media_vectors=``, ``scores=`` or
    ``hf_model=``, see :mod:`fusion.retrieval.external`). Returns the
    :class:`~fusion.retrieval.stage.RetrievalResult` (metrics, headline metrics, per-query ranks)."""
    from fusion.retrieval.cli import evaluate_artifacts

    return evaluate_artifacts(model, media, first_stage=first_stage, queries=queries, out=out,
                              store=_store(store), run=run, **params)
