"""What a stage function sees (:class:`StageContext`) and the code that runs one stage in a Ray task.

The stage writes into ``ctx.out`` (a local folder). When the function returns, the engine writes the
manifest (parameters, inputs, metrics, wall time, versions, host) and moves the folder into the store;
if it raises, nothing becomes visible as an artifact and the attempt is kept under ``failed/``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import logging
import platform
import socket
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import StageFailed
from .registry import Resources, StageType
from .store import LOG, Artifact, ArtifactStore, now_iso
from .tracking import MLflowTarget, StageTracking

T = TypeVar("T")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("stele", "torch", "ray"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass
class StageContext:
    """Handed to every stage function as its first argument."""

    stage: str                      # the stage's name in the pipeline
    key: str                        # the artifact key being produced
    out: Path                       # write the artifact's files here
    inputs: dict[str, Artifact]     # role -> finished upstream artifact (local folder + manifest)
    resources: Resources
    state_uri: str                  # resumable state that survives a killed run (checkpoints)
    log: logging.Logger
    metrics: dict[str, Any] = field(default_factory=dict)
    # The run's MLflow side (``stele run --mlflow``), for training loops: ``fit(..., tracking=
    # ctx.tracking)``; None when the run logs to TensorBoard only.
    tracking: StageTracking | None = None
    _progress: Any = None           # the driver's ProgressHub actor, or None
    _last_report: float = 0.0

    @property
    def input(self) -> Artifact:
        """The single input, for stages that take exactly one."""
        if len(self.inputs) != 1:
            raise StageFailed(f"stage {self.stage!r} expects exactly one input, got "
                              f"{sorted(self.inputs) or 'none'}")
        return next(iter(self.inputs.values()))

    def progress(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        """Iterate ``items`` while the driver's live display shows a progress bar for this stage.

        Updates are throttled (at most ~4 a second) so a tight loop pays almost nothing.
        """
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        last, done = 0.0, 0
        self._report(desc, 0, total)
        for done, item in enumerate(items, 1):
            yield item
            now = time.monotonic()
            if now - last > 0.25:
                last = now
                self._report(desc, done, total)
        self._report(desc, done, total)
        self.log.info("%s: %d%s done", desc or "progress", done, f"/{total}" if total else "")

    def report_progress(self, desc: str, done: int, total: int | None = None) -> None:
        """Set this stage's progress bar directly, for work that is not one Python loop over items
        (e.g. batches streaming back from Ray Data); throttled like :meth:`progress`."""
        now = time.monotonic()
        if now - self._last_report > 0.25 or (total is not None and done >= total):
            self._last_report = now
            self._report(desc, done, total)

    def progress_reporter(self) -> "ProgressReporter | None":
        """A picklable handle other processes (Ray Train workers) can report this stage's
        progress through; None when no live display is listening."""
        return ProgressReporter(self._progress, self.stage) if self._progress is not None else None

    def _report(self, desc: str, done: int, total: int | None) -> None:
        if self._progress is not None:
            self._progress.update.remote(self.stage, desc, done, total)


@dataclass(frozen=True)
class ProgressReporter:
    """``update(desc, done, total)`` from any process of the cluster to the driver's display."""

    hub: Any
    stage: str

    def update(self, desc: str, done: int, total: int | None) -> None:
        self.hub.update.remote(self.stage, desc, done, total)


class _Tee:
    """Copy a stream (stdout/stderr of the stage) into the stage's log file."""

    def __init__(self, stream: Any, log_file: Any):
        self.stream, self.log_file = stream, log_file

    def write(self, s: str) -> int:
        self.log_file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.log_file.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def execute_stage(st: StageType, params: dict[str, Any], stage: str, key: str,
                  input_keys: dict[str, str], store_uri: str, resources: dict[str, float],
                  progress: Any = None, force: bool = False,
                  mlflow: MLflowTarget | None = None) -> dict[str, Any]:
    """Run one stage and commit its artifact. Never raises: the outcome is returned as plain data so
    the driver reports the stage's own error, not a Ray wrapper around it."""
    store = ArtifactStore(store_uri)

    def waiting() -> None:
        if progress is not None:
            progress.update.remote(stage, "waiting for another run making this artifact", 0, None)

    # One maker per artifact at a time, across runs that share the store: a second run of the
    # same stage waits here, then finds the artifact complete and reuses it.
    with store.lock(key, on_wait=waiting):
        if store.is_complete(key) and not force:  # finished by a concurrent run in the meantime
            return {"status": "cached"}
        return _run_and_commit(st, params, stage, key, input_keys, store, resources, progress, force,
                               mlflow)


def _run_and_commit(st: StageType, params: dict[str, Any], stage: str, key: str,
                    input_keys: dict[str, str], store: ArtifactStore, resources: dict[str, float],
                    progress: Any, force: bool, mlflow: MLflowTarget | None) -> dict[str, Any]:
    import ray  # a stage runs as a Ray task; its log names the node

    work = store.new_work_dir(key)
    started, started_unix, t0 = now_iso(), time.time(), time.perf_counter()
    log = logging.getLogger(f"stele.stage.{stage}")
    log.setLevel(logging.INFO)
    log.propagate = False
    log_file = open(work / LOG, "a", buffering=1)
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    log.addHandler(handler)
    root.addHandler(handler)
    failure: tuple[BaseException, str] | None = None
    ctx: StageContext | None = None
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, log_file)), \
                contextlib.redirect_stderr(_Tee(sys.stderr, log_file)):
            inputs = {role: store.open(k) for role, k in input_keys.items()}
            ctx = StageContext(stage=stage, key=key, out=work, inputs=inputs,
                               resources=Resources(**resources), state_uri=store.state_uri(key),
                               log=log, _progress=progress,
                               tracking=mlflow and StageTracking(mlflow, stage, key, st.name, params))
            log.info("stage %s (%s v%s) key %s on %s, ray node %s", stage, st.name, st.version,
                     key, socket.gethostname(), ray.get_runtime_context().get_node_id())
            returned = st.fn(ctx, st.params.model_validate(params))
            if returned:
                ctx.metrics.update(returned)
            if ctx.tracking is not None:  # before the commit moves the folder away
                ctx.tracking.finish(ctx.metrics, work)
        log.info("stage finished in %.3f s", time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - report any failure, KeyboardInterrupt included
        failure = e, traceback.format_exc()
        log.error("stage failed:\n%s", failure[1])
        if ctx is not None and ctx.tracking is not None:
            try:
                ctx.tracking.finish(None, None)
            except Exception as te:  # noqa: BLE001 - the stage's own error is the one reported
                log.error("could not mark the MLflow run failed: %s", te)
    finally:
        log.removeHandler(handler)
        root.removeHandler(handler)
        with contextlib.suppress(OSError):  # on a full disk the log keeps what it could
            log_file.close()
    wall = time.perf_counter() - t0
    if failure is not None:
        return _failed(store, stage, key, work, *failure, wall)
    manifest = {
        "stage": stage, "type": st.name, "code_version": st.version, "params": params,
        "inputs": input_keys, "metrics": ctx.metrics, "wall_s": wall, "started_at": started,
        "finished_at": now_iso(), "started_unix": started_unix, "finished_unix": time.time(),
        "versions": versions(), "host": socket.gethostname(),
        "resources": resources,
    }
    try:
        store.commit(key, work, manifest, replace=force)
    except OSError as e:
        if disk_full(e) is None:
            raise
        return _failed(store, stage, key, work, e, traceback.format_exc(), wall)
    return {"status": "ran", "wall_s": wall, "metrics": ctx.metrics}


def disk_full(e: BaseException) -> OSError | None:
    """The "no space left" (or over quota) error behind ``e``, if that is what it is."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _failed(store: ArtifactStore, stage: str, key: str, work: Path, e: BaseException, tb: str,
            wall: float) -> dict[str, Any]:
    """Keep a failed attempt under ``failed/<key>`` and say why. A full disk is one line naming the
    stage, the file and the store, and the attempt's partial output is removed (only its log is
    kept) so that the space comes back: nothing of it was committed."""
    full = disk_full(e)
    if full is None:
        where = store.keep_failed(key, work)
        return {"status": "failed", "error_type": type(e).__name__, "error": str(e) or repr(e),
                "traceback": "" if isinstance(e, StageFailed) else tb, "log": f"{where}/{LOG}",
                "wall_s": wall}
    log = store.discard_attempt(key, work)
    return {"status": "failed", "error_type": "OSError",
            "error": f"no space left on device writing {full.filename or work}: stage {stage!r} "
                     f"committed nothing to store {store.uri}; free space and run again",
            "traceback": "", "log": log, "wall_s": wall}  # the traceback is in the log
