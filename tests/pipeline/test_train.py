"""The Ray Train harness: DDP on CPU (gloo), checkpoints, and exact resume after a failure."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.tracking import StageTracking, mlflow_target
from pipeline.train import MODEL_FILE, TrainConfig, TrainSession, fit


@dataclass(frozen=True)
class Job:
    log_dir: str
    crash_at: int | None


def loop(config: dict) -> None:
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    s = TrainSession(model, opt, sched, config)
    job: Job = config["job"]
    log = Path(job.log_dir)
    (log / f"start-{uuid.uuid4().hex}-rank{s.rank}").write_text(json.dumps(s.resumed_from))
    for step in s.steps():
        # The data position is the step: batches are a pure function of (step, rank).
        g = torch.Generator().manual_seed(1000 * step + s.rank)
        x = torch.randn(16, 4, generator=g)
        loss = F.mse_loss(s.model(x), x.sum(1, keepdim=True))  # dropout draws from the global RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        s.data_state["seen"] = s.data_state.get("seen", 0) + len(x)
        if s.rank == 0:  # what TensorBoard shows at this moment (flushed at each checkpoint)
            seen = read_scalars(Path(config["_tensorboard"])).get("loss", {})
            (log / f"tb-before-step{step}").write_text(json.dumps(sorted(seen)))
        marker = log / f"crashed-rank{s.rank}"
        if step == job.crash_at and s.rank == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("simulated worker failure")
        s.report({"loss": loss.item(), "noise": torch.rand(()).item()})


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value from TensorBoard event files, read as TensorBoard does: in file order,
    a session restart purging the steps it re-does."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        at = 0
        while at + 12 <= len(data):  # record: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[at:at + 8])
            if at + 16 + n > len(data):
                break
            ev = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 16 + n
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                for steps in out.values():
                    for k in [k for k in steps if k >= ev.step]:
                        del steps[k]
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def _fit(tmp: Path, name: str, max_failures: int, crash_at: int | None, storage: Path | None = None,
         tracking: StageTracking | None = None):
    log = tmp / f"log-{name}"
    log.mkdir(exist_ok=True)
    train = TrainConfig(num_workers=2, use_gpu=False, max_steps=7, checkpoint_every=2,
                        max_failures=max_failures, seed=3)
    res = fit(loop, Job(str(log), crash_at), train,
              storage_uri=str(storage or tmp / f"storage-{name}"), name="t", tracking=tracking)
    return res, log


def _starts(log: Path) -> list:
    return sorted(json.loads(p.read_text()) or 0 for p in log.glob("start-*"))


def _weights(res) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(res.checkpoint_dir / MODEL_FILE))


@pytest.mark.slow
def test_resume_is_exact_after_worker_failure_and_after_a_killed_driver(tmp_path: Path,
                                                                          ray_local: None) -> None:
    straight, _ = _fit(tmp_path, "straight", max_failures=0, crash_at=None)
    assert straight.step == 7 and [h["step"] for h in straight.history] == list(range(1, 8))
    assert straight.data_state == {"seen": 7 * 16}

    # 1. A worker dies at step 5; Ray Train restarts the group from the step-4 checkpoint.
    retried, log = _fit(tmp_path, "retried", max_failures=1, crash_at=5)
    assert _starts(log) == [0, 0, 4, 4]  # two ranks fresh, then two ranks resumed at step 4
    # 2. The whole run fails (no retries left), as when the pipeline is killed; a new fit() on the
    #    same storage continues from the latest checkpoint. Both attempts log to MLflow, as a stage
    #    of `stele run --mlflow` does (the engine marks the failed attempt's run FAILED).
    storage = tmp_path / "storage-killed"
    target = mlflow_target((tmp_path / "mlruns").as_uri(), "train-test")  # a local file: store
    first = StageTracking(target, "s", "k", "test", {"lr": 0.05, "train": {"seed": 3}})
    with pytest.raises(Exception, match="simulated worker failure"):
        _fit(tmp_path, "killed", max_failures=0, crash_at=5, storage=storage, tracking=first)
    first.finish(None, None)
    second = StageTracking(target, "s", "k", "test", {"lr": 0.05, "train": {"seed": 3}})
    resumed, log = _fit(tmp_path, "killed", max_failures=0, crash_at=5, storage=storage,
                        tracking=second)
    assert _starts(log) == [0, 0, 4, 4]
    # One MLflow run for both attempts: every step once, with the uninterrupted run's values.
    assert second.run is not None and first.run is not None
    assert second.run.run_id == first.run.run_id and second.run.logged_step == 4
    client = first.run.client()
    losses = client.get_metric_history(first.run.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 8))
    assert {m.step: m.value for m in losses} == pytest.approx(
        {h["step"]: h["loss"] for h in straight.history})
    assert client.get_run(first.run.run_id).data.params == {"lr": "0.05", "train.seed": "3"}

    # TensorBoard got every step while training (flushed with each checkpoint), and once each
    # after a resume; the stage copies the events into its artifact.
    assert json.loads((log / "tb-before-step5").read_text()) == [1, 2, 3, 4]
    for res in (straight, retried, resumed):
        tb = tmp_path / f"tb-{id(res)}"
        assert res.save_tensorboard(tb)
        scalars = read_scalars(tb)
        assert set(scalars) == {"loss", "noise"}
        assert scalars["loss"] == pytest.approx({h["step"]: h["loss"] for h in straight.history})

    ref = _weights(straight)
    for res in (retried, resumed):
        assert res.history == straight.history  # losses and RNG draws, step by step
        assert res.data_state == straight.data_state
        w = _weights(res)
        assert w.keys() == ref.keys()
        for k in ref:
            assert torch.equal(w[k], ref[k]), k  # bit for bit, not approximately

    # The local copy of the final checkpoint goes with the result: runs leave no temp folders.
    local = straight.checkpoint_dir
    assert (local / MODEL_FILE).is_file()
    del straight
    assert not local.exists()
