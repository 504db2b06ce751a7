"""Runs of a store: starting one, and the records they leave (``runs/<run-id>.json``).

A store's folders are named by content keys; the names a user knows are the pipeline's stage names,
and only the run records map one to the other. ``stele show STAGE``, ``stele ls``, ``stele eval
retrieval`` and the Python API (``stele.load``) read that map through the lookups here, so a stage
name means the same thing everywhere: the artifact of the latest run that made or reused it.
:func:`start_run` is what ``stele run`` and ``stele.run`` share (start or join Ray, run, total time).
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpecError, StoreError
from .store import MANIFEST, ArtifactStore

if TYPE_CHECKING:
    from rich.console import Console

    from .runner import PlannedStage, RunResult
    from .spec import Pipeline

FINISHED = ("ran", "cached")  # the statuses whose stage has an artifact in the store
_KEY_LIKE = re.compile(r"[0-9a-f]{6,64}")


# ---------------------------------------------------------------------------------- records
def list_runs(store: ArtifactStore) -> list[str]:
    """Run ids in the store, oldest first (ids start with the start time, so they sort by it)."""
    base = store._join("runs")
    if not store.fs.exists(base):
        return []
    return sorted(posixpath.basename(p)[:-5] for p in store.fs.ls(base, detail=False)
                  if p.endswith(".json"))


def read_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    with store.fs.open(store._join("runs", f"{run_id}.json"), "r") as f:
        return json.load(f)


def resolve_run(store: ArtifactStore, ref: str = "latest", pipeline_file: Path | None = None,
                pipeline_name: str | None = None) -> dict[str, Any]:
    """The run record for ``ref``: ``latest``, a run id or a unique prefix of one; with
    ``pipeline_file`` (and its name), the latest run of that pipeline."""
    runs = list_runs(store)
    if not runs:
        raise StoreError(f"no runs recorded in {store.uri}")
    if pipeline_file is not None:
        want = str(pipeline_file.resolve())
        by_name = None
        for rid in reversed(runs):
            rec = read_run(store, rid)
            f = rec.get("pipeline_file")
            if f and str(Path(f).resolve()) == want:
                return rec
            if by_name is None and pipeline_name and rec.get("pipeline") == pipeline_name:
                by_name = rec
        if by_name is not None:  # run from another working directory: same pipeline name
            return by_name
        raise StoreError(f"no run of {pipeline_file} in {store.uri}")
    if ref == "latest":
        return read_run(store, runs[-1])
    hits = [ref] if ref in runs else [r for r in runs if r.startswith(ref)]
    if not hits:
        raise StoreError(f"no run {ref!r} in {store.uri} (latest: {runs[-1]})")
    if len(hits) > 1:
        raise StoreError(f"run {ref!r} is ambiguous in {store.uri}: {', '.join(hits[:8])}")
    return read_run(store, hits[0])


def run_wall_s(record: dict[str, Any]) -> float | None:
    """Wall time of a recorded run (start to end, to the second), None if the record lacks it."""
    fmt = "%Y-%m-%dT%H:%M:%S%z"
    try:
        return (dt.datetime.strptime(record["finished_at"], fmt)
                - dt.datetime.strptime(record["started_at"], fmt)).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------- stage names
@dataclass(frozen=True)
class StageRef:
    """Where a stage name led: the artifact ``key`` of stage ``stage`` (of type ``type``) as run
    ``run_id`` recorded it (``status`` ran or cached)."""

    stage: str
    key: str
    type: str
    run_id: str
    status: str


def find_stage(store: ArtifactStore, stage: str, run: str | None = None) -> StageRef:
    """The artifact of ``stage`` in run ``run`` (an id, a prefix or ``latest``), or, without
    ``run``, in the latest run where it ran or was cached. :class:`StoreError` (one line) when no
    run has it, or when it failed or was skipped there."""
    records = ([resolve_run(store, run)] if run  # newest first, read only as far as needed
               else (read_run(store, r) for r in reversed(list_runs(store))))
    names: set[str] = set()
    seen = None  # (run id, status) of the latest run that names the stage without an artifact
    first = None
    for rec in records:
        first = first or rec["run_id"]
        stages = rec.get("stages", {})
        names.update(stages)
        o = stages.get(stage)
        if o is None:
            continue
        if o.get("status") in FINISHED and o.get("key"):
            return StageRef(stage, o["key"], o.get("type", ""), rec["run_id"], o["status"])
        seen = seen or (rec["run_id"], o.get("status", "unknown"))
    if first is None:
        raise StoreError(f"no runs recorded in {store.uri}, so no stage names: give a key")
    if seen:
        rid, status = seen
        if run:
            raise StoreError(f"stage {stage!r} {status} in run {rid}: it has no artifact")
        raise StoreError(f"stage {stage!r} has no artifact: no run made or reused it (the latest "
                         f"run with it, {rid}: {status})")
    known = sorted(names)
    close = difflib.get_close_matches(stage, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; stages: {', '.join(known[:12])}" + (
        ", ..." if len(known) > 12 else "")
    scope = f"run {first}" if run else f"the runs of {store.uri}"
    raise StoreError(f"no stage {stage!r} in {scope}{hint}")


def resolve_artifact(store: ArtifactStore, ref: str, run: str | None = None) -> tuple[str, StageRef | None]:
    """``(key, how)`` for what a user typed: an artifact folder, a stage name (its artifact in the
    latest run that has it, or in ``run``), or a key or a prefix of 6+ characters. ``how`` is the
    :class:`StageRef` when a stage name was resolved, else None. A name a run records wins over
    a key prefix it also happens to be."""
    if run:
        found = find_stage(store, ref, run)
    elif store.local and (Path(ref) / MANIFEST).exists():
        return store.resolve(ref), None
    else:
        try:
            found = find_stage(store, ref)
        except StoreError:
            if _KEY_LIKE.fullmatch(ref) or "/" in ref:  # a key (prefix) or a path: the store says
                return store.resolve(ref), None
            raise
    if not store.is_complete(found.key):
        raise StoreError(f"stage {ref!r} of run {found.run_id}: its artifact {found.key[:12]} is no "
                         f"longer in {store.uri}")
    return found.key, found


# ---------------------------------------------------------------------------------- running
def plan_run(pipeline: Pipeline, store: ArtifactStore, force: list[str] | None = None,
             until: str | None = None, verify: bool = False) -> dict[str, PlannedStage]:
    """:func:`pipeline.runner.plan`, with an unknown ``force``/``until`` stage a spec error."""
    from .runner import plan

    try:
        return plan(pipeline, store, force, until, verify)
    except KeyError as e:
        raise SpecError(e.args[0], file="--force/--until") from None


def start_run(pipeline: Pipeline, store: ArtifactStore, *, force: list[str] | None = None,
              until: str | None = None, verify: bool = False, address: str | None = None,
              num_cpus: int | None = None, console: Console | None = None,
              live: bool | None = None, mlflow: str | bool | None = None) -> RunResult:
    """What ``stele run`` does between the spec and the summary: check the store can be written,
    plan (spec errors before Ray starts), start or join Ray when something is to run (``address``
    / ``$RAY_ADDRESS``, else a local Ray), run, and note the total wall time in the result.
    ``mlflow``: a tracking URI, or True for the default (:func:`pipeline.tracking.default_mlflow_uri`);
    the experiment is the pipeline's name."""
    from .runner import run
    from .tracking import mlflow_target

    store.check_writable()
    planned = plan_run(pipeline, store, force, until, verify)
    to_run = any(p.action == "run" for p in planned.values())
    target = None  # a run that trains nothing opens no MLflow experiment
    if mlflow and to_run:
        target = mlflow_target(None if mlflow is True else str(mlflow), pipeline.name)
    if to_run:  # a fully cached run needs no Ray
        from .ray_utils import init_ray

        info = init_ray(address, num_cpus)
        if console is not None:
            console.print(f"ray: {info['address']} ({info['resources'].get('CPU', 0):g} CPU, "
                          f"{info['resources'].get('GPU', 0):g} GPU)", style="dim")
    t0 = time.monotonic()
    result = run(pipeline, store, force=force, until=until, verify=verify, console=console, live=live,
                 mlflow=target)
    result.wall_s = time.monotonic() - t0
    return result
