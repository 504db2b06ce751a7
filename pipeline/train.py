"""The one Ray Train harness every training stage uses, whatever it trains.

Three layers, as in Ray's own examples:

* the stage (a thin driver) calls :func:`fit` with a ``train_loop_per_worker``, the loop's own frozen
  typed settings (the *job*: a dataclass the loop reads as ``config["job"]``) and a :class:`TrainConfig`;
* :func:`fit` builds the ``TorchTrainer`` (DDP over N workers: gloo on CPU, nccl on GPU), with
  ``RunConfig(storage_path=ctx.state_uri)``, ``CheckpointConfig`` and ``FailureConfig(max_failures)``;
* inside each worker, :class:`TrainSession` owns the bookkeeping: seeding, DDP wrapping, checkpoints
  every N steps, exact resume (model, optimizer, scheduler, step, per-rank RNG, data position, metric
  history), bf16 autocast on GPU and metric reporting.

Resume works at two levels: a worker failure is retried by Ray Train from the latest checkpoint
(``max_failures``), and a killed pipeline run resumes because the run's storage lives under the
store's ``state/<key>`` folder, which Ray Train v2 restores from when the same run is started again.

Checkpoints hold no pickle: weights are safetensors, optimizer/scheduler/RNG states are loaded with
``torch.load(weights_only=True)``, the rest is JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .tracking import StageTracking, Tracker, copy_events

STATE_FILE = "train_state.json"
MODEL_FILE = "model.safetensors"
EXTRA_FILE = "extra.safetensors"


# torch.compile's modes, and "off" for eager (TrainConfig.compile and the stages that expose it).
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


class ScalingParams(BaseModel):
    """Where a training stage runs: nest it in a stage's parameters (``scaling: {num_workers: 2}``)."""

    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(default=1, ge=1, description="DDP workers (one per GPU when use_gpu)")
    use_gpu: bool | None = Field(default=None, description="None: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=1, ge=-1, description="worker failures to recover from")
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description="Ray custom resources each worker asks for besides its CPUs "
        "(e.g. {node_b: 0.1}: workers only on nodes started with node_b)")

    @model_serializer(mode="wrap")
    def _drop_unset_resources(self, handler: Any) -> dict[str, Any]:
        # Left out when None, so the parameters (and artifact keys) of stages that do not pin their
        # workers stay what they were before the field existed.
        out = handler(self)
        if self.resources_per_worker is None:
            out.pop("resources_per_worker", None)
        return out


class TrainConfig(ScalingParams):
    """Training-loop settings the harness needs, on top of where it runs. A "step" is whatever the
    loop reports once for (an optimizer step for one loop, a whole epoch for another)."""

    max_steps: int = Field(default=1000, ge=1, description="steps to run")
    checkpoint_every: int = Field(default=100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="TrainSession.autocast: auto = bf16 on CUDA and on CPUs with native "
        "bf16 (cpu_bf16_native), else fp32; bf16 or fp32 forces it")
    compile: CompileMode = Field(
        default="off", description="torch.compile the model in every worker with this mode "
        "(reduce-overhead and max-autotune add CUDA graphs on a GPU, for short sequences); off: eager")


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 natively, so that bf16 autocast speeds a CPU step up.

    oneDNN runs CPU bf16 matmuls on AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm); without
    them it emulates bf16 in fp32 arithmetic plus conversions, slower than plain fp32. Hence not
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` on x86: it is also true on any AVX512BW CPU (the
    emulation). On x86, torch's cpuinfo queries ``torch.cpu._is_avx512_bf16_supported()`` and
    ``_is_amx_tile_supported()`` (every AMX CPU has AMX-BF16) check the instruction sets and that the OS
    enables their registers; they are private, so where they are missing /proc/cpuinfo's flags
    (``avx512_bf16``, ``amx_bf16``) stand in. On Arm, the mkldnn query checks exactly the BF16 extension.
    """
    import platform

    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(c) for c in checks):
        return any(bool(c()) for c in checks)
    return bool({"avx512_bf16", "amx_bf16"} & _cpuinfo_flags())


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for ln in text.splitlines() if ln.startswith("flags") for f in ln.split(":", 1)[1].split()}


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device_type`` for ``precision`` "bf16", none for "fp32"; "auto": bf16 on CUDA
    and on a CPU with native bf16 (:func:`cpu_bf16_native`), none elsewhere (an emulating CPU, MPS)."""
    import torch

    if precision == "auto":
        bf16 = device_type == "cuda" or (device_type == "cpu" and cpu_bf16_native())
    elif precision in ("bf16", "fp32"):
        bf16 = precision == "bf16"
    else:
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _gpu_available() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def fit(train_loop_per_worker: Callable[[dict], None], job: Any,
        train: TrainConfig, *, storage_uri: str, name: str = "train",
        datasets: dict[str, Any] | None = None, progress: Any = None,
        progress_desc: str = "step", tracking: StageTracking | None = None) -> "FitResult":
    """Run (or resume) a training loop with Ray Train; returns the final checkpoint and history.

    ``job`` is what the loop needs of the stage, typed and frozen (a ``@dataclass(frozen=True)``);
    each worker finds it as ``config["job"]``, beside the harness's own keys that
    :class:`TrainSession` reads. ``storage_uri`` should be the stage's ``ctx.state_uri``: a second
    call with the same ``storage_uri`` and ``name`` continues from the latest checkpoint instead of
    starting over.
    ``progress`` (``ctx.progress_reporter()``) shows rank 0's steps in the live display.
    Rank 0 streams every reported row to TensorBoard (under the state) and, when the run asked for
    MLflow (``tracking=ctx.tracking``), to the stage's MLflow run (:mod:`pipeline.tracking`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray import cloudpickle

    use_gpu = _gpu_available() if train.use_gpu is None else train.use_gpu
    # What travels to every worker inside the config: it must not grow with the data (object
    # references and artifact URIs pickle small). Reported so stages and benchmarks can show it.
    job_bytes = len(cloudpickle.dumps(job))
    tensorboard = f"{storage_uri.rstrip('/')}/{name}-tensorboard"
    mlflow = tracking.start(f"{storage_uri.rstrip('/')}/{name}") if tracking is not None else None
    config = {"job": job, "_train": train.model_dump(), "_progress": progress,
              "_progress_desc": progress_desc, "_tensorboard": tensorboard, "_mlflow": mlflow}
    trainer = _trainer_class(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **(train.resources_per_worker or {})}),
        run_config=RunConfig(
            name=name,
            **_storage(storage_uri),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    with ckpt.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        # Removed when the result is dropped (or at exit): a stage reads the weights and lets go,
        # so repeated runs leave no copies of every final checkpoint in the temp folder.
        local = tempfile.TemporaryDirectory(prefix="stele-ckpt-")
        for p in Path(d).iterdir():
            if p.is_file():
                (Path(local.name) / p.name).write_bytes(p.read_bytes())
    return FitResult(checkpoint_dir=Path(local.name), _local=local, step=state["step"],
                     history=state["history"],
                     data_state=state["data_state"], stopped=state.get("stopped", False),
                     job_bytes=job_bytes, tensorboard_uri=tensorboard)


def _storage(uri: str) -> dict[str, Any]:
    """Ray Train's ``storage_path`` (and ``storage_filesystem``) for a store URI. A remote store goes
    through the same fsspec filesystem as the rest of stele (wrapped for pyarrow), so its settings
    (``FSSPEC_S3_ENDPOINT_URL`` for MinIO, credentials) hold for checkpoints too; pyarrow's own S3
    client would ignore them."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return {"storage_path": uri}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}


def _trainer_class(base: type) -> type:
    """``TorchTrainer``, minus its placement-group cleaner when Ray has no State API.

    Ray Train 2.60's cleaner (which frees placement groups if the controller dies) polls the State
    API, which needs the dashboard; an embedded Ray started without one (``init_ray``) makes every
    poll time out after 10 s, and each ``fit`` then waits for the cleaner's own timeout to stop it:
    a fixed cost of seconds per run (BENCHMARKS.md, "Ray Train's fixed cost per fit"). Ray itself
    frees the placement groups of a finished job, so on a local Ray the cleaner buys nothing.
    """
    if os.environ.get("STELE_RAY_STATE_API", "1") != "0":
        return base

    class Trainer(base):
        def _create_default_callbacks(self):  # noqa: ANN202 - Ray's own signature
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback)

            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


@dataclass
class FitResult:
    checkpoint_dir: Path          # a local copy of the final checkpoint (model.safetensors, ...)
    step: int
    history: list[dict[str, Any]]  # one dict of metrics per reported step
    data_state: dict[str, Any]
    stopped: bool = False           # ended early by TrainSession.stop()
    job_bytes: int = 0              # the pickled job shipped to each worker (flat in the data size)
    tensorboard_uri: str = ""       # where rank 0 streamed its TensorBoard events (under the state)
    # Owns ``checkpoint_dir`` when fit made it: the folder goes with this object.
    _local: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)

    def save_tensorboard(self, dest: Path) -> bool:
        """Copy the TensorBoard events rank 0 wrote while training into ``dest`` (an artifact's
        ``tb/``); False when there are none (:func:`pipeline.tracking.copy_events`)."""
        return copy_events(self.tensorboard_uri, dest)


@dataclass
class TrainSession:
    """Per-worker training bookkeeping. Build the model, optimizer and scheduler, then::

        session = TrainSession(model, optimizer, scheduler, config)   # restores if resuming
        for step in session.steps():
            with session.autocast():
                loss = ...
            ...
            session.report({"loss": loss.item()})  # checkpoints every N steps and at the end

    ``session.model`` is the DDP-wrapped model (compiled when ``compile`` is set);
    ``session.data_state`` is a dict the loop keeps its data position in (epoch, batch, ...); it is
    saved with every checkpoint and restored on resume.
    """

    model: Any
    optimizer: Any
    scheduler: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    data_state: dict[str, Any] = field(default_factory=dict)
    # Tensors the loop keeps across resumes besides the model (e.g. the best weights so far).
    extra: dict[str, Any] = field(default_factory=dict)
    # Passed to DistributedDataParallel, e.g. find_unused_parameters for objectives that may
    # leave a head unused in a batch (a dEA head on a batch without entities).
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import ray.train
        import ray.train.torch
        import torch

        from .ray_utils import tune_malloc

        tune_malloc()  # a training step reallocates the same large tensors: keep them mapped
        self.train = TrainConfig.model_validate(self.config.get("_train", {}))
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.step = 0
        self.stopped = False
        self.history: list[dict[str, Any]] = []
        self.raw_model = self.model
        _seed_all(self.train.seed * 1000 + self.rank)
        ckpt = ray.train.get_checkpoint()
        self.resumed_from: int | None = None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self._load(Path(d), torch)
            self.resumed_from = self.step
        self.model = ray.train.torch.prepare_model(
            self.raw_model, parallel_strategy_kwargs=self.ddp_kwargs or None)
        if self.train.compile != "off":
            # Compiled around DDP (dynamo splits the graph at its gradient buckets, so the
            # all-reduce still overlaps the backward); checkpoints keep using the eager raw_model.
            # Dynamic shapes from the first compile: batches differ in length (each is padded to
            # its longest row), and one graph then serves them all instead of a recompile at the
            # second length (CUDA graphs are still recorded per shape).
            self.model = torch.compile(self.model, dynamic=True, mode=None if self.train.compile == "default"
                                       else self.train.compile)
        self.device = ray.train.torch.get_device()
        tb, mlflow = self.config.get("_tensorboard"), self.config.get("_mlflow")
        self._tracker = Tracker(tb, mlflow, self.step) if self.rank == 0 and (tb or mlflow) else None

    # -- loop --------------------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        """Step numbers still to do: ``step+1 .. max_steps`` (all of them on a fresh start)."""
        while self.step < self.train.max_steps and not self.stopped:
            before = self.step
            yield self.step + 1
            if self.step != before + 1:  # a loop that forgot to report would never end
                raise RuntimeError("call session.report(...) exactly once per step")

    def stop(self) -> None:
        """End training after this step's report (early stopping); that report checkpoints, so a
        resumed run stops too. Every rank must call it on the same step."""
        self.stopped = True

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX, Arm BF16), where it
        speeds steps up; a no-op elsewhere (emulated bf16 is slower than fp32). ``TrainConfig.precision``
        ("bf16", "fp32") overrides the choice (:func:`autocast_context`)."""
        return autocast_context(self.train.precision, self.device.type)

    def report(self, metrics: dict[str, Any]) -> None:
        """Record this step's metrics; checkpoint every ``checkpoint_every`` steps and at the end.

        Only checkpoints go through ``ray.train.report``: each call is a barrier with Ray Train's
        controller (which polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), so
        reporting every short step would dominate the run. The full history travels in the
        checkpoint instead.
        """
        import ray.train

        self.step += 1
        row = {"step": self.step, **{k: float(v) for k, v in metrics.items()}}
        if self.train.compile != "off":
            # Dynamo's counts in this worker process since it started (a resumed run starts again
            # from 0): graphs compiled and graph breaks met while tracing. A break runs eagerly,
            # so these say how much of a step the compiler actually holds.
            from torch._dynamo.utils import counters

            row["compiled_graphs"] = float(counters["stats"]["unique_graphs"])
            row["graph_breaks"] = float(sum(counters["graph_break"].values()))
        self.history.append(row)
        if self._tracker is not None:
            self._tracker.add(row)
        reporter = self.config.get("_progress")
        if reporter is not None and self.rank == 0:
            reporter.update(self.config.get("_progress_desc", "step"), self.step,
                            self.train.max_steps)
        due = (self.step % self.train.checkpoint_every == 0 or self.step >= self.train.max_steps
               or self.stopped)
        if not due:
            return
        if self._tracker is not None:  # what a checkpoint covers is on TensorBoard's side too
            self._tracker.flush(final=self.step >= self.train.max_steps or self.stopped)
        with tempfile.TemporaryDirectory() as d:
            self._save(Path(d))
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))

    # -- state ---------------------------------------------------------------------------------
    def _save(self, d: Path) -> None:
        import torch
        from safetensors.torch import save_file, save_model

        torch.save(_rng_state(torch), d / f"rng_rank{self.rank}.pt")
        if self.rank != 0:  # Ray merges every rank's files into one checkpoint folder
            return
        # save_model stores tied weights (an MLM head sharing the word embeddings) once
        save_model(self.raw_model, str(d / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
        if self.scheduler is not None:
            torch.save(self.scheduler.state_dict(), d / "scheduler.pt")
        if self.extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.extra.items()},
                      str(d / EXTRA_FILE))
        (d / STATE_FILE).write_text(json.dumps({
            "step": self.step, "world_size": self.world_size, "data_state": self.data_state,
            "history": self.history, "stopped": self.stopped}))

    def _load(self, d: Path, torch: Any) -> None:
        from safetensors.torch import load_file, load_model

        state = json.loads((d / STATE_FILE).read_text())
        load_model(self.raw_model, str(d / MODEL_FILE))
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        if self.scheduler is not None and (d / "scheduler.pt").exists():
            self.scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
        self.step, self.history = state["step"], state["history"]
        self.stopped = state.get("stopped", False)
        if (d / EXTRA_FILE).exists():
            self.extra.update(load_file(str(d / EXTRA_FILE)))
        self.data_state.update(state["data_state"])
        rng = d / f"rng_rank{self.rank}.pt"
        if state["world_size"] == self.world_size and rng.exists():
            _set_rng_state(torch, torch.load(rng, weights_only=True))
        else:  # a different world size cannot resume per-rank RNG streams: reseed by step
            _seed_all(self.train.seed * 1000 + self.rank + 7919 * self.step)


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(torch: Any) -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states, in types weights_only can load."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"cpu": torch.get_rng_state(), "python": [version, list(internal), gauss],
           "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(torch: Any, state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


__all__ = ["CompileMode", "FitResult", "ScalingParams", "TrainConfig", "TrainSession", "autocast_context",
           "cpu_bf16_native", "fit"]
