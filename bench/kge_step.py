"""One TransE training step's distance, forward + backward, three ways, alternated in one process:

* ``autograd``   PyTorch autograd over ``-|| E[h] + W[r] - E[t] ||_1`` of the ``B (1 + k)`` triples
                 (PyG's TransE formula on projected entities; what a bare PyTorch loop does);
* ``triples``    stele's ``TranslationDistance`` over the same triples (hand-written backward,
                 cache-sized chunks);
* ``parts``      stele's TransE as ``knowledge.embed`` calls it, ``model(h, r, t, corruptions=...)``:
                 the positives and their drawn corruptions, built from per-positive parts
                 (``CorruptionDistance``).

Defaults: PyKEEN's benchmarking configuration on Kinships' sizes (104 entities, 25 relations, dim
256, batch 512, 38 negatives, L1), 2 threads, glibc malloc tuned as in stele's workers. Each round
times ``--steps`` steps per variant (fresh random positives and corruptions per step) and reports
the median step; the table gives each variant's median over rounds and its ratio to ``autograd``.

    python bench/kge_step.py [--entities 104] [--dim 256] [--batch 512] [--negatives 38]
    python bench/kge_step.py --device cuda     # on a GPU: one chunk, timed with synchronisation
"""

from __future__ import annotations

import argparse
import time
from statistics import median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=104)
    ap.add_argument("--relations", type=int, default=25)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--negatives", type=int, default=38)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    if args.device == "cpu":  # the allocator stele's CPU workers run with
        from pipeline.ray_utils import tune_malloc

        tune_malloc()
    import torch

    from knowledge.embed import draw_corruptions
    from knowledge.models import _translation_distance, build_model, corruption_triples

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_e, n_r, b, k = args.entities, args.relations, args.batch, args.negatives
    dev = torch.device(args.device)
    model = build_model("transe", n_e, n_r, args.dim, p_norm=1.0, entity_norm=2.0).to(dev)
    ent, rel = model.node_emb.weight, model.rel_emb.weight

    def draw() -> tuple:
        pos = torch.stack([torch.randint(n, (b,)) for n in (n_e, n_r, n_e)], 1)
        return pos.to(dev), tuple(x.to(dev) for x in draw_corruptions(pos, k, n_e, None))

    def sync() -> None:  # a GPU step is only done when its kernels are
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def triples(pos: torch.Tensor, drawn: tuple) -> torch.Tensor:
        return torch.cat([pos, corruption_triples(pos, *drawn)])

    def autograd(pos: torch.Tensor, drawn: tuple) -> torch.Tensor:
        t = triples(pos, drawn)
        return -(ent[t[:, 0]] + rel[t[:, 1]] - ent[t[:, 2]]).abs().sum(-1)

    def fused_triples(pos: torch.Tensor, drawn: tuple) -> torch.Tensor:
        t = triples(pos, drawn)
        return _translation_distance().apply(ent, rel, ent, t[:, 0], t[:, 1], t[:, 2], 1)

    def parts(pos: torch.Tensor, drawn: tuple) -> torch.Tensor:
        return model(pos[:, 0], pos[:, 1], pos[:, 2], corruptions=drawn)

    variants = {"autograd": autograd, "triples": fused_triples, "parts": parts}
    weights = torch.randn(b * (1 + k), device=dev)

    # the three give the same scores and gradients
    pos, drawn = draw()
    ref = None
    for name, fn in variants.items():
        model.zero_grad()
        s = fn(pos, drawn)
        (s * weights).sum().backward()
        got = (s.detach(), ent.grad.clone(), rel.grad.clone())
        if ref is None:
            ref = got
        else:
            err = max((a - g).abs().max().item() for a, g in zip(ref, got))
            print(f"{name}: max abs difference to autograd (scores, entity and relation grads) {err:.1e}")

    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            steps = []
            for _ in range(args.steps + 3):
                pos, drawn = draw()
                sync()
                t0 = time.perf_counter()
                model.zero_grad(set_to_none=True)
                (fn(pos, drawn) * weights).sum().backward()
                sync()
                steps.append(time.perf_counter() - t0)
            times[name].append(median(steps[3:]))  # 3 warm-up steps
    print(f"\n{n_e} entities, dim {args.dim}, batch {b} x (1 + {k}) rows, L1, "
          f"{args.device if dev.type != 'cpu' else f'{args.threads} threads'}; "
          f"median step (ms) per round, then the median over rounds")
    base = median(times["autograd"])
    for name, ts in times.items():
        rounds = " ".join(f"{1000 * t:6.2f}" for t in ts)
        print(f"{name:9} {rounds}   median {1000 * median(ts):6.2f} ms  "
              f"{median(ts) / base:5.2f}x autograd")


if __name__ == "__main__":
    main()
