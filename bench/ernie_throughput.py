"""ERNIE training throughput and MFU, stele's ``fusion.models.ernie`` vs transformers' BERT MLM, in one run.

Issue 22 asks for >= 40% model-FLOPs utilisation for ERNIE on a BERT-base-size backbone at bf16, at a
realistic batch and sequence length. This script times full training steps without Ray (the GPU
image has torch and transformers but not Ray): forward, backward and an AdamW step (fused on CUDA),
under bf16 autocast with ``--bf16``, eager or ``--compile MODE`` (``torch.compile`` of the
objective; reduce-overhead adds CUDA graphs), on the same random batch for

* ``stele``         :class:`fusion.models.ernie.Ernie` over a randomly initialised BERT (seed 0): half
  the layers T-Encoder, half K-Encoder (ERNIE's 6 + 6 at the base size), a frozen table of 50,000
  100-d entity vectors, 3 two-token mentions per sequence; its loss is MLM + dEA
  (``Ernie.loss``: its own masking, the vocabulary projection only at masked positions);
* ``transformers``  ``transformers.BertForMaskedLM`` of the same size with 15% MLM labels: the plain
  BERT step the field measures MFU on (its vocabulary projection covers every position).

Batch: ``--batch`` sequences of up to ``--length`` wordpieces, each item 3/4 to all of it long
(per-item padding). Each implementation runs in a fresh process (so peak memory is its own), in
alternating order over ``--rounds``. Reported per implementation: the median step time, real
tokens/s, its model FLOPs per step (``torch.utils.flop_counter`` over one forward + backward: matmuls
and attention), model TFLOP/s and, on a known GPU, MFU (those over the card's dense bf16 peak, or
``--peak-tflops``), peak memory; and the stele / transformers ratio of tokens/s. FLOPs and MFU count
every position computed, padding included, as ``fusion.pretrain``'s manifests do; the batch's
padding share is printed beside them (useful work is that much less). On a CPU it runs in
float32 unless ``--bf16`` (a smoke test; MFU needs a GPU's peak).

    python bench/ernie_throughput.py --configs tiny --steps 5               # CPU smoke test
    python bench/ernie_throughput.py --device cuda --bf16 --batch 64 --rounds 2
    python bench/ernie_throughput.py --device cuda --bf16 --batch 256 --length 128
    python bench/ernie_throughput.py --device cuda --bf16 --batch 64 --compile default
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

CONFIGS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VOCAB, MASK_ID, CLS_ID, SEP_ID = 30522, 103, 101, 102      # bert-base-uncased's vocabulary
ENTITIES, ENTITY_DIM, MENTIONS = 50_000, 100, 3
ROOT = Path(__file__).resolve().parents[1]


def make_batch(batch: int, length: int, seed: int = 1) -> dict:
    """Token ids with [CLS]/[SEP] and per-item padding, ERNIE's per-token entity rows (-1: none)
    and, for transformers, the same ids with 15% of the real wordpieces masked and their labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3 * length // 4, length + 1, (batch,), generator=g)
    lengths[0] = length
    pos = torch.arange(length)[None]
    attn = (pos < lengths[:, None]).long()                                   # (B, L)
    ids = torch.randint(1000, VOCAB, (batch, length), generator=g) * attn
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    special = ((pos == 0) | (pos == lengths[:, None] - 1) | (attn == 0)).long()
    entity_idx = torch.full((batch, length), -1)
    for b in range(batch):      # MENTIONS two-token mentions at distinct places inside the text
        starts = 1 + 2 * torch.randperm((int(lengths[b]) - 2) // 2, generator=g)[:MENTIONS]
        for s, e in zip(starts.tolist(), torch.randint(0, ENTITIES, (MENTIONS,), generator=g).tolist()):
            entity_idx[b, s:s + 2] = e
    chosen = (torch.rand(batch, length, generator=g) < 0.15) & (special == 0)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": attn, "special_tokens_mask": special,
            "entity_idx": entity_idx, "hf_input_ids": torch.where(chosen, MASK_ID, ids), "hf_labels": labels}


# ------------------------------------------------------------------------------ worker (one process)


def worker(spec: dict) -> dict:
    import types

    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from fusion.models.backbone import TextBackbone
    from fusion.models.ernie import Ernie

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=512, attn_implementation="sdpa",
                                  **CONFIGS[spec["config"]])
    torch.manual_seed(0)
    if spec["impl"] == "stele":
        bert = transformers.BertModel(cfg, add_pooling_layer=False)
        backbone = TextBackbone(bert, types.SimpleNamespace(mask_token_id=MASK_ID), "random")
        model = Ernie(backbone, torch.randn(ENTITIES, ENTITY_DIM))
        del bert, backbone
    else:
        model = transformers.BertForMaskedLM(cfg)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in make_batch(spec["batch"], spec["length"]).items()}
    gen = torch.Generator(device).manual_seed(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    # The objective, eager and (``--compile MODE``) compiled: FLOPs are counted on the eager one,
    # since a compiled function first called under the counter stays eager for good.
    def objective() -> torch.Tensor:
        if spec["impl"] == "stele":
            return model.loss(batch, gen)["total"]
        return model(input_ids=batch["hf_input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["hf_labels"]).loss

    compiled = objective if spec["compile"] == "off" else torch.compile(
        objective, mode=None if spec["compile"] == "default" else spec["compile"])

    def loss(fn=compiled) -> torch.Tensor:  # noqa: ANN001
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            return fn()

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:   # one forward + backward, not timed
        loss(objective).backward()
    opt.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())
    for _ in range(spec["warmup"]):
        step()
    sync()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    real = int(batch["attention_mask"].sum())
    out = {"impl": spec["impl"], "median_step_s": med, "min_step_s": min(times),
           "tokens_per_s": real / med, "gflop_per_step": flops / 1e9,
           "padding_share": 1 - real / batch["attention_mask"].numel(),
           "model_tflops_per_s": flops / med / 1e12,
           "params": sum(p.numel() for p in model.parameters()),
           "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_name"] = torch.cuda.get_device_name()
    return out


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="base", help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per implementation, alternating")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                    help="torch.compile both objectives with this mode (warm-up steps include compiling)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak (default: the known cards' datasheet figure)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
    from fusion_throughput import PEAK_BF16_TFLOPS, run_worker   # bench/ is on sys.path (this folder)

    print(f"# ERNIE vs BERT MLM: batch {args.batch} x {args.length}, {args.device}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, compile {args.compile}, "
          f"{args.steps} timed steps after {args.warmup}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for config in args.configs.split(","):
        results: dict[str, list[dict]] = {"stele": [], "transformers": []}
        for r in range(args.rounds):
            for impl in (("stele", "transformers") if r % 2 == 0 else ("transformers", "stele")):
                spec = {"impl": impl, "config": config, "batch": args.batch, "length": args.length,
                        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                        "device": args.device, "bf16": args.bf16, "compile": args.compile}
                res = run_worker(spec, __file__)
                results[impl].append(res)
                print(json.dumps({"config": config, "round": r, **res}), flush=True)
        gpu = results["stele"][0].get("gpu_name", "")
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
        print(f"\n{config}: median over rounds | tokens/s | GFLOP/step | model TFLOP/s | MFU | params | "
              f"peak {'GPU' if gpu else 'RSS'} MiB")
        tps = {}
        for impl, rs in results.items():
            tps[impl] = statistics.median(x["tokens_per_s"] for x in rs)
            tf = statistics.median(x["model_tflops_per_s"] for x in rs)
            mfu = f"{tf / peak:.1%}" if peak and args.device == "cuda" else "-"
            mem = max(x.get("gpu_mib", x["rss_mib"]) for x in rs)
            print(f"  {impl:<12} | {tps[impl]:,.0f} | {rs[0]['gflop_per_step']:,.1f} | {tf:.2f} | {mfu} | "
                  f"{rs[0]['params'] / 1e6:.1f}M | {mem:,.0f}")
        print(f"  stele / transformers tokens/s: {tps['stele'] / tps['transformers']:.2f}x; padding "
              f"{results['stele'][0]['padding_share']:.1%} of the positions (counted in the FLOPs)")


if __name__ == "__main__":
    main()
