"""The same KGE training loop hosted four ways, to tell Ray's cost from the machine's: TransE on
Kinships (L1, entities on the unit L2 sphere), ``--epochs`` epochs of ``knowledge.embed.train_epoch``
in one of two settings, ``--setting benchmark`` (PyKEEN's benchmarking configuration: dim 256,
self-adversarial loss, 38 negatives, batch 512, Adam 1.07e-3; 17 steps of 20k rows per epoch) or
``default`` (bench/kge_vs_pykeen.py's: dim 128, margin loss, 16 negatives, batch 256, Adam 0.01;
34 steps of 4k rows), in

* ``plain``   this process (with ``tune_malloc``, as stele's training workers have);
* ``driver``  this process while an embedded Ray runs beside it (``init_ray``);
* ``actor``   a Ray task holding 2 CPUs (a worker process of its own);
* ``train``   a Ray Train ``TorchTrainer`` worker (1 worker, 2 CPUs), as ``knowledge.embed`` runs.

Each host runs ``--rounds`` times, alternated, one at a time, each in a fresh process; the table
gives the median epoch and its 10th-90th percentiles (first 3 epochs left out), and the medians
of the first and second halves of the run (a drift shows there).

    python bench/kge_epoch_hosts.py [--setting benchmark] [--epochs 80] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HOSTS = ("plain", "driver", "actor", "train")


SETTINGS = {
    "benchmark": dict(dim=256, loss="self_adversarial", margin=9.0, shift=9.0, negatives=38,
                      batch_size=512, lr=1.07e-3),
    "default": dict(dim=128, loss="margin", margin=1.0, shift=0.0, negatives=16, batch_size=256,
                    lr=0.01),
}


def epochs(n: int, setting: str = "benchmark", threads: int = 2) -> list[float]:
    """Seconds per epoch of ``n`` epochs, in the calling process."""
    import torch
    from pykeen.datasets import get_dataset

    from knowledge.embed import train_epoch
    from knowledge.models import build_model
    from pipeline.ray_utils import tune_malloc

    tune_malloc()
    torch.set_num_threads(threads)
    ds = get_dataset(dataset="kinships")
    train = ds.training.mapped_triples.long()
    c = SETTINGS[setting]
    torch.manual_seed(0)
    model = build_model("transe", ds.num_entities, ds.num_relations, c["dim"], p_norm=1.0,
                        entity_norm=2.0)
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
    times = []
    for _ in range(n):
        t = time.perf_counter()
        train_epoch(model, opt, train, torch.randperm(len(train)), batch_size=c["batch_size"],
                    negatives=c["negatives"], num_entities=ds.num_entities, head_prob=None,
                    loss=c["loss"], margin=c["margin"], temperature=1.0, shift=c["shift"])
        times.append(time.perf_counter() - t)
    return times


def _train_fn(config: dict) -> None:
    with open(config["out"], "w") as f:
        json.dump(epochs(config["epochs"], config["setting"]), f)


def child(host: str, n: int, setting: str, out: str) -> None:
    if host == "plain":
        times = epochs(n, setting)
    else:
        from pipeline.ray_utils import init_ray

        init_ray()
        import ray

        if host == "driver":
            times = epochs(n, setting)
        elif host == "actor":
            times = ray.get(ray.remote(num_cpus=2)(epochs).remote(n, setting))
        else:
            from ray.train import ScalingConfig
            from ray.train.torch import TorchTrainer

            from pipeline.train import _trainer_class

            _trainer_class(TorchTrainer)(
                _train_fn, train_loop_config={"epochs": n, "setting": setting, "out": out},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2})).fit()
            return
    with open(out, "w") as f:
        json.dump(times, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="benchmark")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.epochs, args.setting, args.child[1])
        return
    env = dict(os.environ, PYSTOW_HOME=os.environ.get("PYSTOW_HOME", tempfile.mkdtemp()))
    print(f"{'host':8} {'round':>5} {'median s':>9} {'p10':>6} {'p90':>6} {'1st half':>9} {'2nd half':>9}")
    for rnd in range(1, args.rounds + 1):
        for host in HOSTS:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs),
                                "--setting", args.setting, "--child", host, out.name], env=env,
                               check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                t = json.load(open(out.name))[3:]
            q = statistics.quantiles(t, n=10)
            half = len(t) // 2
            print(f"{host:8} {rnd:5d} {statistics.median(t):9.3f} {q[0]:6.3f} {q[-1]:6.3f} "
                  f"{statistics.median(t[:half]):9.3f} {statistics.median(t[half:]):9.3f}", flush=True)


if __name__ == "__main__":
    main()
