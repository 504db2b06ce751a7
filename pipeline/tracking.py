"""Live records of training: TensorBoard events and, when a run asks for one, an MLflow run.

Every training loop (rank 0 of the Ray Train harness, or a stage's own in-process loop) feeds a
:class:`Tracker` one row of metrics per step and flushes it when it checkpoints, so what TensorBoard
and MLflow show is what a resumed run continues from.

MLflow is optional (``pip install 'stele[tracking]'``) and asked for per run (``stele run
--mlflow [URI]``). The driver checks it and creates the experiment before Ray starts
(:func:`mlflow_target`); each training stage then opens one MLflow run, tagged with the stele run,
stage and artifact key, and logs its parameters; the loop logs every step's metrics; the stage's
final metrics and its artifact's files are logged when it commits (:class:`StageTracking`). A run
killed mid-training stays RUNNING and the resumed attempt (same artifact key) continues that MLflow
run, logging only the steps it has not logged yet.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError

# MLflow's limits per log_batch call (REST API): 1000 metrics, 100 params.
_METRICS_PER_CALL, _PARAMS_PER_CALL, _PARAM_CHARS = 1000, 100, 500


# -- TensorBoard ------------------------------------------------------------------------------
class TensorBoardStream:
    """Scalars as TensorBoard events while a loop trains, under ``uri`` (a stage's state folder).

    Every reported metric is a scalar at its step (``loss_mlm`` as ``loss/mlm``, so TensorBoard
    groups the losses). Events are written synchronously (tensorboardX's ``EventsWriter``; its
    ``SummaryWriter`` queues them to a thread, and its flush does not wait for the queue, so a
    worker killed after a checkpoint could lose steps the checkpoint covers) and flushed with every
    checkpoint. A local store gets them in place, so ``tensorboard --logdir <store>/state`` follows
    a run live; on an object store they go to a local folder, uploaded at each flush. A resumed run
    starts a new file whose first event purges the steps after its checkpoint, so the curves show
    each step once.
    """

    def __init__(self, uri: str, resumed_step: int = 0):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self.pb = event_pb2
        self.fs, self.path = fsspec.core.url_to_fs(uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.dir = self.path if self.local else tempfile.mkdtemp(prefix="stele-tb-")
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        # The suffix orders two files of the same second (file names hold seconds) by start step.
        self.writer = EventsWriter(f"{self.dir}/events", filename_suffix=f".step{resumed_step:09d}")
        if resumed_step:
            self._write(step=resumed_step + 1,
                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

    def _write(self, **fields: Any) -> None:
        self.writer.write_event(self.pb.Event(wall_time=time.time(), **fields))

    def add(self, row: dict[str, float]) -> None:
        from tensorboardX.summary import scalar

        for k, v in row.items():
            if k != "step":
                self._write(step=int(row["step"]), summary=scalar(k.replace("loss_", "loss/", 1), v))

    def flush(self, final: bool = False) -> None:
        self.writer.flush()
        if not self.local:
            self.fs.put(self.dir.rstrip("/") + "/", self.path, recursive=True)
        if final:
            self.writer.close()


def copy_events(uri: str, dest: Path) -> bool:
    """Copy the TensorBoard events streamed to ``uri`` into ``dest`` (an artifact's ``tb/``): the
    state folder they were streamed to goes when the artifact is committed. False when there are
    none."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri) if uri else (None, "")
    if fs is None or not fs.exists(path):
        return False
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return True


# -- MLflow -----------------------------------------------------------------------------------
def _mlflow_client(uri: str) -> Any:
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance and refuses it unless opted in; a user who
        # names a file: store has opted in. (Set in every process that logs: rank 0 runs elsewhere.)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise SpecError("MLflow is not installed: pip install 'stele[tracking]'", file="--mlflow") from e
    return MlflowClient(tracking_uri=uri)


def default_mlflow_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else a SQLite database in the current folder: MLflow 3's
    own default (a ``file:`` store works when named, see :func:`_mlflow_client`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@dataclass(frozen=True)
class MLflowTarget:
    """Where a stele run logs: a tracking URI and an experiment (created by the driver)."""

    uri: str
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)  # on every MLflow run of this stele run

    def for_run(self, run_id: str) -> MLflowTarget:
        return dataclasses.replace(self, tags={**self.tags, "stele.run_id": run_id})


def mlflow_target(uri: str | None, experiment: str) -> MLflowTarget:
    """Check MLflow is installed and reachable at ``uri`` and create (or find) ``experiment``, on the
    driver before Ray starts, so a typo or a missing package is one line, not a failed stage. A
    local SQLite database keeps run artifacts beside it (``mlruns/``), not in each worker's folder."""
    uri = uri or default_mlflow_uri()
    try:
        client = _mlflow_client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return MLflowTarget(uri, exp.experiment_id, {"stele.pipeline": experiment})
        where = None
        if uri.startswith("sqlite:///"):
            where = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
        return MLflowTarget(uri, client.create_experiment(experiment, artifact_location=where),
                            {"stele.pipeline": experiment})
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SpecError(f"{uri}: {type(e).__name__}: {first}", file="--mlflow") from e


@dataclass(frozen=True)
class MLflowRun:
    """One MLflow run: picklable, so the stage hands it to its training workers."""

    uri: str
    run_id: str
    logged_step: int = 0  # steps up to here are already in the run (a resumed attempt)

    def client(self) -> Any:
        return _mlflow_client(self.uri)

    def log(self, client: Any, metrics: list[tuple[str, Any, int]] = (),
            params: dict[str, str] | None = None) -> None:
        """Log ``metrics`` ((name, value, step); names made valid, non-finite values left out)
        and ``params``, in as many calls as MLflow's per-call limits need."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        ms = [Metric(metric_name(k), float(v), now, step) for k, v, step in metrics if _finite(v)]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, len(ms), _METRICS_PER_CALL):
            client.log_batch(self.run_id, metrics=ms[i:i + _METRICS_PER_CALL])
        for i in range(0, len(ps), _PARAMS_PER_CALL):
            client.log_batch(self.run_id, params=ps[i:i + _PARAMS_PER_CALL])


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts it (alphanumerics and ``_-. :/``): ``hits@10`` is ``hits_at_10``."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.001", ...}``: a stage's parameters as MLflow params (dotted keys; values as
    strings, cut at 500 characters)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(obj)[:_PARAM_CHARS]}


@dataclass
class StageTracking:
    """A stage's side of MLflow: opens (or resumes) its run on first use, and at commit logs the
    stage's metrics and files and ends the run. Stages reach it as ``ctx.tracking``."""

    target: MLflowTarget
    stage: str
    key: str
    type: str
    params: dict[str, Any]
    run: MLflowRun | None = None

    def start(self, attempt: str, resume: bool = True) -> MLflowRun:
        """The MLflow run of this training ``attempt`` (the stage's state URI and loop name): the
        unfinished run a killed attempt left (``resume``: the loop continues from its checkpoint),
        or a new one with the stage's parameters (a loop without checkpoints starts over: the
        killed attempt's run is marked FAILED)."""
        if self.run is not None:
            return self.run
        client = _mlflow_client(self.target.uri)
        found = client.search_runs([self.target.experiment_id],
                                   filter_string=f"tags.`stele.attempt` = '{attempt}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found and found[0].info.status != "FINISHED" and not resume:
            client.set_terminated(found[0].info.run_id, status="FAILED")
        elif found and found[0].info.status != "FINISHED":
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            steps = [m.step for k in found[0].data.metrics for m in client.get_metric_history(run_id, k)]
            self.run = MLflowRun(self.target.uri, run_id, max(steps, default=0))
            return self.run
        tags = {**self.target.tags, "stele.stage": self.stage, "stele.key": self.key,
                "stele.type": self.type, "stele.attempt": attempt}
        run_id = client.create_run(self.target.experiment_id, run_name=self.stage, tags=tags).info.run_id
        self.run = MLflowRun(self.target.uri, run_id)
        self.run.log(client, params=flat_params(self.params))
        return self.run

    def finish(self, metrics: dict[str, Any] | None, out: Path | None) -> None:
        """End the run (if the stage opened one): FINISHED with the stage's numeric metrics (at the
        last logged step) and ``out``'s files as artifacts; FAILED when ``out`` is None."""
        if self.run is None:
            return
        client = _mlflow_client(self.run.uri)
        if out is None:
            client.set_terminated(self.run.run_id, status="FAILED")
            return
        self.run.log(client, [(f"final/{k}", v, 0) for k, v in (metrics or {}).items()])
        client.log_artifacts(self.run.run_id, str(out))
        client.set_terminated(self.run.run_id, status="FINISHED")


# -- what a loop feeds --------------------------------------------------------------------------
class Tracker:
    """One training loop's live record: ``add(row)`` every step, ``flush()`` at each checkpoint.

    Rows go to TensorBoard (``tensorboard``: a folder URI, or None) at once and to MLflow (``mlflow``:
    an :class:`MLflowRun`, or None) in one batch per flush, so a step reaches MLflow when the
    checkpoint that covers it is written. ``resumed_step``: the checkpoint a resumed loop starts
    from; steps the MLflow run already holds are not logged twice."""

    def __init__(self, tensorboard: str | None, mlflow: MLflowRun | None, resumed_step: int = 0):
        self.tb = TensorBoardStream(tensorboard, resumed_step) if tensorboard else None
        self.mlflow = mlflow
        self.client = mlflow.client() if mlflow is not None else None  # one per loop, not per flush
        self.pending: list[dict[str, float]] = []

    def add(self, row: dict[str, float]) -> None:
        if self.tb is not None:
            self.tb.add(row)
        if self.mlflow is not None and row["step"] > self.mlflow.logged_step:
            self.pending.append(row)

    def flush(self, final: bool = False) -> None:
        if self.tb is not None:
            self.tb.flush(final)
        if self.mlflow is not None and self.pending:
            rows, self.pending = self.pending, []
            self.mlflow.log(self.client, [(k, v, int(row["step"])) for row in rows
                                          for k, v in row.items() if k != "step"])
