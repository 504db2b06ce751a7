"""Filtered link-prediction evaluation at scale: stele's ``rank_metrics`` vs PyKEEN's evaluator.

One random graph (default: 100k entities, 11 relations, 198k training and 2k test triples) and one
TransE (dim 64, L2) with the *same* weights on both sides; both-sided filtered evaluation (filter =
train + test), realistic ranks. Each evaluation runs in its own fresh Python process; reported:

* ``eval s``   wall time of the evaluation call alone (inside the process: no imports, no data loading)
* ``wall s``   the whole process (imports + loading + evaluation)
* ``peak RSS`` the process's peak resident set, from ``os.wait4``'s rusage of that child

PyKEEN runs at several batch sizes (its CPU default is 32) and the best is the reference.

Same scores on both sides: PyG's TransE scores ``-||n(e_h) + w_r - n(e_t)||_p`` with n = L_p
normalisation *inside* ``forward``; PyKEEN's TransE scores ``-||e_h + w_r - e_t||_p`` and only
normalises entities after each training step (``entity_constrainer``). So PyKEEN gets the already
normalised entity table n(E) and stele the raw one: the score functions agree up to float32 rounding
(PyKEEN broadcasts ``(b, N, d)`` differences, stele uses one GEMM per chunk via ``torch.cdist``), so a
handful of near-tied candidates may swap; the script counts how many per-triple ranks differ.

The test triples are planted so that ranks spread from 1 to N (a random model would rank every test
triple near N / 2 and make Hits@k trivially 0 on both sides): the tail of test triple i is the best
of a random candidate subset whose size is log-uniform in [1, N].

Goal: stele <= 0.1 x PyKEEN's best evaluation time, with <= 2 GB peak RSS.

    python bench/kge_eval_scale.py                      # full size (minutes, several GB for PyKEEN)
    python bench/kge_eval_scale.py --entities 10000 --train 19800 --test 200 --pykeen-batch 32
    python bench/kge_eval_scale.py --devices cpu,cuda --pykeen-batch ''   # stele on a GPU vs its CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRICS = ("mrr", "mr", "hits@1", "hits@3", "hits@10")
PYKEEN_NAMES = {"mrr": "inverse_harmonic_mean_rank", "mr": "arithmetic_mean_rank",
                "hits@1": "hits_at_1", "hits@3": "hits_at_3", "hits@10": "hits_at_10"}


# -- data (parent) -------------------------------------------------------------------------------
def make_data(args: argparse.Namespace, root: Path) -> None:
    """Random training graph, planted test triples, PyG TransE weights; written as safetensors."""
    import torch
    from safetensors.torch import save_file

    from knowledge.models import build_model

    g = torch.Generator().manual_seed(args.seed)
    n, nr = args.entities, args.relations
    torch.manual_seed(args.seed)
    model = build_model("transe", n, nr, args.dim, p_norm=args.p_norm)
    # A random graph: no structure for the model to have learnt, filtering still matters where
    # (h, r) or (r, t) pairs repeat.
    train = torch.stack([torch.randint(n, (args.train,), generator=g),
                         torch.randint(nr, (args.train,), generator=g),
                         torch.randint(n, (args.train,), generator=g)], 1).unique(dim=0)
    with torch.no_grad():
        ent = torch.nn.functional.normalize(model.node_emb.weight, p=args.p_norm, dim=-1)
        rel = model.rel_emb.weight
        h = torch.randint(n, (args.test,), generator=g)
        r = torch.randint(nr, (args.test,), generator=g)
        sizes = torch.exp(torch.rand(args.test, generator=g) * torch.log(torch.tensor(float(n))))
        t = torch.empty_like(h)
        for i in range(args.test):  # setup only, not timed
            cand = torch.randint(n, (max(1, int(sizes[i])),), generator=g)
            d = torch.cdist((ent[h[i]] + rel[r[i]])[None], ent[cand], p=args.p_norm)[0]
            t[i] = cand[d.argmin()]
    test = torch.stack([h, r, t], 1).unique(dim=0)
    # keep the test triples out of training (a triple is in exactly one split)
    key = lambda x: (x[:, 0] * nr + x[:, 1]) * n + x[:, 2]  # noqa: E731
    train = train[~torch.isin(key(train), key(test))]
    save_file({"train": train, "test": test}, str(root / "triples.safetensors"))
    from knowledge.models import save_model

    save_model(root, model)
    (root / "config.json").write_text(json.dumps(vars(args)))


# -- children -------------------------------------------------------------------------------------
def child_stele(root: Path, batch_size: int, threads: int, device: str = "cpu") -> dict:
    import torch
    from safetensors.torch import load_file

    from knowledge.evaluate import rank_metrics
    from knowledge.models import load_model

    torch.set_num_threads(threads)
    cfg = json.loads((root / "config.json").read_text())
    tr = load_file(str(root / "triples.safetensors"))
    model = load_model(root)
    known = torch.cat([tr["train"], tr["test"]])
    t0 = time.perf_counter()
    res = rank_metrics(model, tr["test"], known, cfg["entities"], batch_size=batch_size,
                       device=device, num_relations=cfg["relations"])
    eval_s = time.perf_counter() - t0  # the metrics are host floats: the GPU work is done
    n = len(tr["test"])
    ranks = res["ranks"]["filtered"]
    gpu = {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
           "gpu_name": torch.cuda.get_device_name()} if device.startswith("cuda") else {}
    return {"eval_s": eval_s, **gpu,
            "metrics": {side: {k: res["filtered"][side][k] for k in METRICS}
                        for side in ("both", "head", "tail")},
            "ranks_head": ranks[:n].tolist(), "ranks_tail": ranks[n:].tolist()}


def child_pykeen(root: Path, batch_size: int, threads: int) -> dict:
    import torch
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import TransE
    from pykeen.triples import CoreTriplesFactory
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    cfg = json.loads((root / "config.json").read_text())
    tr = load_file(str(root / "triples.safetensors"))
    state = load_file(str(root / "model.safetensors"))
    tf = CoreTriplesFactory.create(mapped_triples=tr["train"], num_entities=cfg["entities"],
                                   num_relations=cfg["relations"])
    model = TransE(triples_factory=tf, embedding_dim=cfg["dim"], scoring_fct_norm=cfg["p_norm"],
                   random_seed=0)
    with torch.no_grad():  # the same scores as PyG's forward: hand over the normalised entities
        model.entity_representations[0]._embeddings.weight.copy_(
            torch.nn.functional.normalize(state["node_emb.weight"], p=cfg["p_norm"], dim=-1))
        model.relation_representations[0]._embeddings.weight.copy_(state["rel_emb.weight"])
    evaluator = RankBasedEvaluator(filtered=True, clear_on_finalize=False)
    t0 = time.perf_counter()
    res = evaluator.evaluate(model, tr["test"], batch_size=batch_size,
                             additional_filter_triples=[tr["train"]], use_tqdm=False)
    eval_s = time.perf_counter() - t0
    import numpy as np

    ranks = {side: np.concatenate(evaluator.ranks[side, "realistic"]) for side in ("head", "tail")}
    return {"eval_s": eval_s,
            "metrics": {side: {k: float(res.get_metric(f"{side}.realistic.{PYKEEN_NAMES[k]}"))
                               for k in METRICS} for side in ("both", "head", "tail")},
            "ranks_head": ranks["head"].astype(float).tolist(),
            "ranks_tail": ranks["tail"].astype(float).tolist()}


def run_child(which: str, root: Path, batch_size: int, threads: int, device: str = "cpu") -> dict:
    """Run one evaluation in a fresh process; peak RSS from ``wait4`` (that child alone)."""
    out = root / f"{which}-{device}-{batch_size}.json"
    cmd = [sys.executable, __file__, "--child", which, "--data", str(root), "--devices", device,
           "--child-batch", str(batch_size), "--threads", str(threads), "--child-out", str(out)]
    log = root / f"{which}-{device}-{batch_size}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as err_file:  # a file, not a pipe: nobody reads a pipe while we wait4
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                                stdout=subprocess.DEVNULL, stderr=err_file)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait
    err = log.read_text(errors="replace")
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {err.strip().splitlines()[-1:] or ''}",
                "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    res = json.loads(out.read_text())
    res.update(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024)  # ru_maxrss is KiB on Linux
    return res


# -- driver ---------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entities", type=int, default=100_000)
    p.add_argument("--relations", type=int, default=11)
    p.add_argument("--train", type=int, default=198_000)
    p.add_argument("--test", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--p-norm", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stele-batch", type=int, default=256)
    p.add_argument("--pykeen-batch", default="8,32,64",
                   help="comma-separated PyKEEN batch sizes; the best time is the reference "
                        "('' for none: stele alone, e.g. where PyKEEN is not installed)")
    p.add_argument("--devices", default="cpu",
                   help="comma-separated devices stele evaluates on (cpu, cuda); the first one is "
                        "compared with PyKEEN (on the CPU), the others with the first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="also write the results here")
    # internal: one evaluation in a child process
    p.add_argument("--child", choices=("stele", "pykeen"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        if args.child == "stele":
            res = child_stele(Path(args.data), args.child_batch, args.threads, args.devices)
        else:
            res = child_pykeen(Path(args.data), args.child_batch, args.threads)
        res["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.child_out).write_text(json.dumps(res))
        return

    with tempfile.TemporaryDirectory(prefix="kge_eval_scale_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_data(args, root)
        print(f"graph: {args.entities} entities, {args.relations} relations, ~{args.train} train, "
              f"{args.test} test triples; TransE dim {args.dim}, p={args.p_norm:g}; "
              f"{args.threads} threads (data in {time.perf_counter() - t0:.1f} s)")
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        runs = {("stele" if i == 0 else f"stele-{d}"):
                [(args.stele_batch, run_child("stele", root, args.stele_batch, args.threads, d))]
                for i, d in enumerate(devices)}
        runs["pykeen"] = [(b, run_child("pykeen", root, b, args.threads))
                          for b in (int(x) for x in args.pykeen_batch.split(",") if x.strip())]

    print(f"\n{'':11} {'batch':>6} {'eval s':>8} {'wall s':>8} {'peak RSS MB':>12}  filtered both MRR")
    for name, rs in runs.items():
        for b, r in rs:
            if "error" in r:
                print(f"{name:11} {b:>6} {'failed':>8} {r['wall_s']:8.1f} {r['peak_rss_mb']:12.0f}  "
                      f"{r['error']}")
            else:
                gpu = f"  ({r['gpu_name']}, peak {r['gpu_peak_mb']:.0f} MB allocated)" if "gpu_name" in r else ""
                print(f"{name:11} {b:>6} {r['eval_s']:8.2f} {r['wall_s']:8.1f} "
                      f"{r['peak_rss_mb']:12.0f}  {r['metrics']['both']['mrr']:.6f}{gpu}")
    st = runs["stele"][0][1]
    for name, rs in runs.items():  # other devices against the first
        if name in ("stele", "pykeen") or "error" in rs[0][1] or "error" in st:
            continue
        other = rs[0][1]
        worst = max(abs(st["metrics"][side][k] - other["metrics"][side][k])
                    / (max(abs(st["metrics"][side][k]), 1.0) if k == "mr" else 1.0)
                    for side in ("both", "head", "tail") for k in METRICS)
        diff = sum(x != y for side in ("head", "tail")
                   for x, y in zip(st[f"ranks_{side}"], other[f"ranks_{side}"]))
        print(f"{name} vs {devices[0]}: eval time {other['eval_s'] / st['eval_s']:.3f}x, "
              f"max metric diff {worst:.2e}, per-triple ranks differing {diff} of "
              f"{2 * len(st['ranks_head'])}")
    if not runs["pykeen"]:
        print("no PyKEEN runs (--pykeen-batch ''): no ratios to PyKEEN")
        return
    ok = [(b, r) for b, r in runs["pykeen"] if "error" not in r]
    if "error" in st or not ok:
        sys.exit("an evaluation failed; no ratios")
    best_b, best = min(ok, key=lambda br: br[1]["eval_s"])

    print(f"\nmetrics (filtered, realistic)   {'stele':>12} {'pykeen':>12} {'|diff|':>10}")
    worst = 0.0
    for side in ("both", "head", "tail"):
        for k in METRICS:
            a, b = st["metrics"][side][k], best["metrics"][side][k]
            worst = max(worst, abs(a - b) / (max(abs(b), 1.0) if k == "mr" else 1.0))
            print(f"  {side + ' ' + k:28} {a:12.6f} {b:12.6f} {abs(a - b):10.2e}")
    diff = sum(x != y for side in ("head", "tail")
               for x, y in zip(st[f"ranks_{side}"], best[f"ranks_{side}"]))
    total = 2 * len(st["ranks_head"])
    print(f"per-triple filtered ranks differing: {diff} of {total}; max metric diff {worst:.2e} "
          f"(MR relative)")

    ratio_t = st["eval_s"] / best["eval_s"]
    print(f"\nstele / PyKEEN best (batch {best_b}): eval time {ratio_t:.3f}x "
          f"({best['eval_s'] / st['eval_s']:.1f}x faster), whole process "
          f"{st['wall_s'] / best['wall_s']:.3f}x, peak RSS {st['peak_rss_mb']:.0f} MB vs "
          f"{best['peak_rss_mb']:.0f} MB ({st['peak_rss_mb'] / best['peak_rss_mb']:.2f}x)")
    print(f"goal: eval time <= 0.1x -> {'met' if ratio_t <= 0.1 else 'NOT met'}; "
          f"peak RSS <= 2048 MB -> {'met' if st['peak_rss_mb'] <= 2048 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"config": {k: v for k, v in vars(args).items() if not k.startswith("child")},
             "runs": {n: [{"batch": b, **{k: v for k, v in r.items() if not k.startswith("ranks")}}
                          for b, r in rs] for n, rs in runs.items()},
             "ratio_eval_time": ratio_t, "ranks_differing": diff}, indent=1))


if __name__ == "__main__":
    main()
