"""Run a validated pipeline on Ray: plan (keys and cache state), schedule, summarise.

Each stage becomes one Ray task with the stage's resources; a stage is submitted as soon as all its
inputs are finished (and its pool, if the pipeline caps it, has room), so independent stages run
concurrently. The driver itself holds no resources.
A failing stage stops its descendants only; everything else still runs.
"""

from __future__ import annotations

import os
import signal
import sysconfig
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from .errors import SpecError
from .fingerprint import missing_inputs, path_roots, portable
from .progress import Row, RunDisplay, start_progress_hub
from .registry import headline_keys
from .spec import Pipeline
from .store import ArtifactStore, artifact_key, now_iso
from .tracking import MLflowTarget


@dataclass
class PlannedStage:
    name: str
    type: str
    key: str
    cached: bool
    action: str  # "cached" | "run" | "excluded"
    reason: str = ""
    replace: bool = False  # the stored artifact is to be replaced (forced, or found damaged)


def plan(pipeline: Pipeline, store: ArtifactStore, force: list[str] | None = None,
         until: str | None = None, verify: bool = False) -> dict[str, PlannedStage]:
    """Keys and what a run would do, stage by stage. Runs nothing.

    ``force``: re-run these stages even if cached, and their descendants (whose inputs change).
    ``until``: run only this stage and its ancestors.
    ``verify``: check every file of the cached artifacts against its manifest; a damaged one
    (a file missing or of another size) is made again and replaces it. Its descendants keep
    theirs: the same stage on the same inputs makes the same artifact.
    """
    for name in [*(force or []), *([until] if until else [])]:
        if name not in pipeline.stages:
            raise KeyError(f"unknown stage {name!r}; stages: {', '.join(pipeline.stages)}")
    forced: set[str] = set()
    for name in force or []:
        forced |= {name} | pipeline.descendants(name)
    wanted = ({until} | pipeline.ancestors(until)) if until else set(pipeline.stages)

    out: dict[str, PlannedStage] = {}
    for name, s in pipeline.stages.items():  # topological order
        input_keys = {role: out[up].key for role, up in s.inputs.items()}
        with path_roots(key_roots(pipeline)):  # keys name paths relative to these: portable
            try:
                with missing_inputs() as missing:
                    fingerprint = s.type.fingerprint(s.params) if s.type.fingerprint else None
            except Exception as e:  # noqa: BLE001 - e.g. the data a stage would read is missing
                raise SpecError(str(e), file=pipeline.source, line=s.line,
                                field=f"stages.{name}.with") from None
            key = artifact_key(s.type.name, s.type.version, portable(s.params.model_dump(mode="json")),
                               input_keys, fingerprint)
        cached = store.is_complete(key)
        if name not in wanted:
            action, reason = "excluded", f"not needed for --until {until}"
        elif name in forced:
            action, reason = "run", "forced"
        elif cached and verify and (damage := store.verify(key)):
            more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
            action, reason = "run", f"damaged: {damage[0]}{more}"
        elif cached:
            action, reason = "cached", ""
        else:
            action, reason = "run", "not in store"
        if action == "run" and missing:  # found now, not minutes later on a Ray worker
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise SpecError(f"input {missing[0]} does not exist{more}", file=pipeline.source,
                            line=s.line, field=f"stages.{name}.with")
        out[name] = PlannedStage(name, s.type.name, key, cached, action, reason,
                                 replace=action == "run" and cached)
    return out


def key_roots(pipeline: Pipeline) -> dict[str, Any]:
    """The folders that paths in cache keys are written relative to (see
    :mod:`pipeline.fingerprint`): the pipeline file's, ``$STELE_DATA``, the working directory, and
    this interpreter's site-packages, so that files a package ships (PyKEEN's datasets,
    countryinfo's JSON) key the same from a colleague's venv in another folder or Python version."""
    paths = sysconfig.get_paths()
    return {"pipeline": pipeline.path.resolve().parent if pipeline.path else None,
            "data": os.environ.get("STELE_DATA"), "cwd": os.getcwd(),
            "packages": paths.get("purelib"), "platpackages": paths.get("platlib")}


@dataclass
class Outcome:
    name: str
    type: str
    key: str
    status: str  # ran | cached | failed | skipped | excluded | interrupted
    wall_s: float | None = None
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    log: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    pipeline: str
    store: str
    outcomes: dict[str, Outcome]
    record: str = ""
    record_error: str = ""
    wall_s: float | None = None  # the whole run, start to end (set by pipeline.runs.start_run)

    @property
    def ok(self) -> bool:
        return all(o.status in ("ran", "cached", "excluded") for o in self.outcomes.values())

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())


def _remote_execute():
    import ray

    from .context import execute_stage

    # max_retries=0: a stage that crashed its worker is reported, not silently retried with the
    # same inputs; retries belong inside stages (Ray Train's FailureConfig) where they can resume.
    return ray.remote(max_retries=0)(execute_stage)


def _custom_requests(stage: Any) -> list[tuple[str, dict[str, float]]]:
    """(field, {resource: amount}) of every Ray custom resource a stage asks for: its task's
    ``resources.custom``, and ``resources_per_worker`` of any :class:`~pipeline.train.ScalingParams`
    in its parameters (each Ray Train worker asks for that much)."""
    from pydantic import BaseModel

    from .train import ScalingParams

    out = [(f"stages.{stage.name}.resources.custom", stage.resources.custom)]

    def walk(model: BaseModel, path: str) -> None:
        if isinstance(model, ScalingParams) and model.resources_per_worker:
            out.append((f"{path}.resources_per_worker", model.resources_per_worker))
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{path}.{name}")

    walk(stage.params, f"stages.{stage.name}.with")
    return [(where, req) for where, req in out if req]


def check_custom_resources(pipeline: Pipeline, stages: list[str]) -> None:
    """Fail before anything runs when one of ``stages`` asks for a custom resource that no alive
    node of the Ray cluster offers (in that amount): Ray would keep the task pending forever.
    Ray must be initialised. (Nodes an autoscaler has yet to start are not known here.)"""
    import ray

    requests = [(n, where, req) for n in stages for where, req in _custom_requests(pipeline.stages[n])]
    if not requests:
        return
    most: dict[str, float] = {}  # resource -> the most one alive node offers
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in node.get("Resources", {}).items():
                most[name] = max(most.get(name, 0.0), amount)
    for n, where, req in requests:
        for name, amount in req.items():
            if most.get(name, 0.0) >= amount:
                continue
            offered = sorted(k for k in most if k not in ("CPU", "GPU", "memory",
                                                          "object_store_memory")
                             and not k.startswith(("node:", "accelerator_type:")))
            why = (f"it asks for {amount:g}, no node offers more than {most[name]:g}"
                   if name in most else "no node of the Ray cluster offers it (custom resources: "
                   f"{', '.join(offered) or 'none'})")
            raise SpecError(f"stage {n!r} would wait forever for custom resource {name!r}: {why}",
                            file=pipeline.source, line=pipeline.stages[n].line, field=where)


class _DeferredInterrupt:
    """Ctrl-C during a run, acted on only where the runner's bookkeeping is whole.

    Python raises ``KeyboardInterrupt`` wherever the main thread happens to be: between submitting
    a stage to Ray and noting it as running, or just after noting that a stage finished and before
    submitting the stages that waited on it. The run record then said ``pending`` of a stage that
    was in flight, or of stages that were due, and nothing was ``interrupted`` (seen on a busy
    machine: ``{'a': 'ran', 'b': 'ran', 'c': 'pending', ...}``). While a run is in the main
    thread, SIGINT only sets a flag, and :meth:`check` raises ``KeyboardInterrupt`` at the one
    point of the loop where every stage that was submitted is in flight: before waiting on them,
    which the loop does every ``poll_s``. A second Ctrl-C during the clean-up changes nothing;
    the previous handler comes back when the run ends. (Elsewhere, or under a handler of the
    caller's own, Ctrl-C is left as it was.)"""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_DeferredInterrupt":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def run(pipeline: Pipeline, store: ArtifactStore, *, force: list[str] | None = None,
        until: str | None = None, verify: bool = False, console: Console | None = None,
        live: bool | None = None, poll_s: float = 0.25, mlflow: MLflowTarget | None = None) -> RunResult:
    """Execute the pipeline; Ray must already be initialised (see :func:`ray_utils.init_ray`).
    ``force``, ``until``, ``verify``: as for :func:`plan`. ``mlflow``: where training stages log
    (:func:`pipeline.tracking.mlflow_target`), or None."""
    import ray

    planned = plan(pipeline, store, force, until, verify)
    check_custom_resources(pipeline, [n for n, p in planned.items() if p.action == "run"])
    store.clean_tmp()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    mlflow = mlflow.for_run(run_id) if mlflow is not None else None
    outcomes = {n: Outcome(n, p.type, p.key, "excluded" if p.action == "excluded" else "pending")
                for n, p in planned.items()}
    rows = {n: Row(n, p.type) for n, p in planned.items()}
    todo = {n for n, p in planned.items() if p.action == "run"}
    for n, p in planned.items():
        if p.action == "cached":
            outcomes[n].status = rows[n].status = "cached"
            manifest = store.manifest(p.key)
            outcomes[n].metrics = manifest.get("metrics", {})
            outcomes[n].wall_s = manifest.get("wall_s")
        elif p.action == "excluded":
            rows[n].status = "excluded"

    remote = _remote_execute()
    hub = start_progress_hub() if todo else None
    running: dict[Any, str] = {}
    in_pool: Counter[str] = Counter()  # running stages per capped pool

    def pool_full(n: str) -> bool:
        pool = pipeline.stages[n].resources.pool
        return pool in pipeline.pools and in_pool[pool] >= pipeline.pools[pool]

    started_at = now_iso()
    display = RunDisplay(rows, console=console, live=live)
    ctrl_c = _DeferredInterrupt()
    with display, ctrl_c:
        for n, o in outcomes.items():
            if o.status == "cached" and not display.live_enabled:
                display.set(n, "cached")
        try:
            while todo or running:
                # Stages whose upstream failed can never run: skip them, keep going elsewhere.
                for n in sorted(todo):
                    bad = [up for up in pipeline.stages[n].inputs.values()
                           if outcomes[up].status in ("failed", "skipped")]
                    if bad:
                        todo.discard(n)
                        outcomes[n].status = "skipped"
                        outcomes[n].error = f"upstream {bad[0]!r} did not finish"
                        display.set(n, "skipped", outcomes[n].error)
                for n in [n for n in pipeline.stages if n in todo]:
                    s = pipeline.stages[n]
                    if all(outcomes[up].status in ("ran", "cached") for up in s.inputs.values()) \
                            and not pool_full(n):
                        todo.discard(n)
                        if s.resources.pool:
                            in_pool[s.resources.pool] += 1
                        outcomes[n].status = "running"  # before Ray has it: never in flight unseen
                        ref = remote.options(
                            num_cpus=s.resources.cpus, num_gpus=s.resources.gpus,
                            resources=dict(s.resources.custom), name=f"stele:{n}",
                        ).remote(s.type, s.params.model_dump(mode="json"), n, planned[n].key,
                                 {r: planned[up].key for r, up in s.inputs.items()}, store.uri,
                                 s.resources.model_dump(), hub, planned[n].replace, mlflow)
                        running[ref] = n
                        display.set(n, "running")
                # The one place a Ctrl-C takes effect: every finished stage is recorded, every stage
                # whose inputs are done has been submitted, every submitted one is in `running`.
                ctrl_c.check()
                if not running:
                    continue
                done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
                for ref in done:
                    n = running.pop(ref)
                    if pipeline.stages[n].resources.pool:
                        in_pool[pipeline.stages[n].resources.pool] -= 1
                    _finish(outcomes[n], ref, display)
                if hub is not None:
                    try:
                        display.progress(ray.get(hub.snapshot.remote(), timeout=5))
                    except Exception:  # noqa: BLE001 - the display must never fail the run
                        pass
            ctrl_c.check()  # Ctrl-C while the last stage was noted: still an interrupted command
        except KeyboardInterrupt:
            # Every stage submitted (or being submitted) and not finished: interrupted, even if
            # cancelling fails because Ray is going down with the runner.
            stopped = [n for n, o in outcomes.items() if o.status == "running"]
            for n in stopped:
                outcomes[n].status = "interrupted"
            for ref in running:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - Ray shuts down with the runner anyway
                    pass
            for n in stopped:
                display.set(n, "failed", "interrupted")
            raise
        finally:
            result = RunResult(run_id, pipeline.name, store.uri, outcomes)
            try:
                result.record = store.record_run({
                    "run_id": run_id, "pipeline": pipeline.name,
                    "pipeline_file": str(pipeline.path) if pipeline.path else None,
                    "started_at": started_at, "finished_at": now_iso(),
                    "stages": {n: asdict(o) for n, o in outcomes.items()},
                })
            except OSError as e:  # a full disk: the summary still tells what happened
                result.record_error = f"the run record was not written: {e.strerror or e}"
    return result


def _finish(outcome: Outcome, ref: Any, display: RunDisplay) -> None:
    import ray
    from ray.exceptions import RayError

    try:
        res = ray.get(ref)
    except RayError as e:  # the worker itself died (OOM killer, segfault, node lost)
        cause = getattr(e, "cause", None) or e
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        res = {"status": "failed", "error_type": type(cause).__name__,
               "error": lines[-1] if lines else repr(cause), "traceback": str(e)}
    outcome.status = res["status"]
    outcome.wall_s = res.get("wall_s")
    outcome.metrics = res.get("metrics", {})
    for k in ("error_type", "error", "traceback", "log"):
        setattr(outcome, k, res.get(k, ""))
    note = f"{outcome.error_type}: {outcome.error}" if outcome.status == "failed" else ""
    display.set(outcome.name, outcome.status, note, outcome.wall_s)


def print_summary(result: RunResult, console: Console) -> None:
    """What ran, what was cached, what failed and why: the stage's own error, not Ray's wrapper;
    the total wall time when the result has it. Stage text is printed as it is: markup escaped
    and no emoji codes (``:x:`` stays ``:x:``)."""
    counts = ", ".join(f"{result.count(s)} {s}" for s in ("ran", "cached", "failed", "skipped",
                                                        "interrupted") if result.count(s))
    style = "bold green" if result.ok else "bold red"
    took = ""
    if result.wall_s is not None:
        from .report.page import fmt_seconds  # the report's format, so both read alike

        took = f" in {fmt_seconds(result.wall_s)}"
    console.print(f"[{style}]{escape(result.pipeline)}: {counts or 'nothing to do'}{took}[/] "
                  f"(store {escape(result.store)}, run {result.run_id})", emoji=False)
    if result.record_error:
        console.print(f"[yellow]warning:[/] {escape(result.record_error)}", highlight=False,
                      emoji=False)
    for o in result.outcomes.values():
        if o.status in ("ran", "cached") and o.metrics:
            console.print(f"  {escape(o.name)}: {escape(_headline(o.metrics, o.type))}", style="dim",
                          highlight=False, emoji=False)
    for o in result.outcomes.values():
        if o.status == "failed":
            console.print(f"[bold red]✖ {escape(o.name)}[/] {escape(f'[{o.type}]')} "
                          f"{escape(o.error_type)}: {escape(o.error)}", highlight=False,
                          emoji=False)
            if o.traceback:
                last = [ln for ln in o.traceback.strip().splitlines() if ln.strip()]
                frame = next((ln.strip() for ln in reversed(last) if ln.strip().startswith("File ")),
                             "")
                if frame:
                    console.print(f"    at {frame}", style="dim", highlight=False, markup=False,
                                  emoji=False)
            if o.log:
                console.print(f"    log: {o.log}", style="dim", highlight=False, markup=False,
                              emoji=False)
        elif o.status == "skipped":
            console.print(f"[yellow]↷ {escape(o.name)}[/] skipped: {escape(o.error)}",
                          highlight=False, emoji=False)


def _headline(metrics: dict[str, Any], type_name: str = "", limit: int = 6) -> str:
    """A stage's headline metrics for the run summary (:func:`~pipeline.registry.headline_keys`,
    those with a value). All of them are in its manifest."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k in headline_keys(metrics, type_name, limit)
                     if (v := metrics[k]) is not None)
