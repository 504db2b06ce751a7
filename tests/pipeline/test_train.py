"""The Ray Train harness: DDP on CPU (gloo), checkpoints, and exact resume after a failure."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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
        marker = log / f"crashed-rank{s.rank}"
        if step == job.crash_at and s.rank == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("simulated worker failure")
        s.report({"loss": loss.item(), "noise": torch.rand(()).item()})


def _fit(tmp: Path, name: str, max_failures: int, crash_at: int | None, storage: Path | None = None):
    log = tmp / f"log-{name}"
    log.mkdir(exist_ok=True)
    train = TrainConfig(num_workers=2, use_gpu=False, max_steps=7, checkpoint_every=2,
                        max_failures=max_failures, seed=3)
    res = fit(loop, Job(str(log), crash_at), train,
              storage_uri=str(storage or tmp / f"storage-{name}"), name="t")
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
    #    same storage continues from the latest checkpoint.
    storage = tmp_path / "storage-killed"
    with pytest.raises(Exception, match="simulated worker failure"):
        _fit(tmp_path, "killed", max_failures=0, crash_at=5, storage=storage)
    resumed, log = _fit(tmp_path, "killed", max_failures=0, crash_at=5, storage=storage)
    assert _starts(log) == [0, 0, 4, 4]

    ref = _weights(straight)
    for res in (retried, resumed):
        assert res.history == straight.history  # losses and RNG draws, step by step
        assert res.data_state == straight.data_state
        w = _weights(res)
        assert w.keys() == ref.keys()
        for k in ref:
            assert torch.equal(w[k], ref[k]), k  # bit for bit, not approximately
