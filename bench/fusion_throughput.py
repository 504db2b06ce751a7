"""LXMERT training throughput, stele's ``fusion.models.lxmert`` vs ``transformers.LxmertModel``, in one run.

Same configuration and the same random weights: the driver builds one ``transformers.LxmertModel``
per configuration (seed 0) and saves its weights; each implementation then runs in a fresh process
(so peak RSS is its own), loading them (stele through ``fusion.models.hf_weights.load_hf_lxmert_state``), and
times forward + backward steps in training mode (dropout on) on the same random batch: text of 20
tokens with per-item padding (lengths 10..20), 36 regions with boxes, 2048-d features. The loss is
the same for both: the mean squares of language_output, vision_output and pooled_output. No
optimiser step (it costs both the same).

Reported per implementation: forward+backward steps/s (timed steps over their wall time; and from
the median step time, which a shared machine's scheduler stalls of a few steps do not move), text
tokens/s (B x 20 per step), model GFLOP per step (analytic, the same number for both: 2 x
multiply-adds of every matmul in the encoder, backward = 2 x forward), peak RSS of the process,
and the stele/transformers ratios.
``--rounds N`` repeats both in fresh processes in alternating order. The load average is printed:
on a 2-core machine shared with other jobs, 2-thread timings are only comparable within one run.
Configurations: ``tiny`` (hidden 128, 2/2/2 layers, 2 heads) and ``paper`` (hidden 768, 9/5/5,
12 heads, ~208M parameters with 2048-d features).

Goal (from the issue): stele >= 1.2x; the figures are in BENCHMARKS.md ("LXMERT training
throughput, stele vs transformers"). On a CPU both are bound by matrix multiplies at these sizes:
attention is a small share of the FLOPs and SDPA's CPU flash kernel does not take attention dropout,
so the CPU cannot show the SDPA lever; the GPU mode is where it applies.

On a GPU, ``--device cuda --bf16`` runs under bf16 autocast and adds model FLOPs utilisation (MFU:
analytic FLOPs per second over the card's dense bf16 peak, ``--peak-tflops`` or a known card) and
peak allocated GPU memory. Without CUDA it says so and runs on the CPU in float32.

On the CPU, ``--bf16`` times four variants: stele under ``torch.autocast("cpu", dtype=torch.bfloat16)``
(what ``pipeline.train.TrainSession.autocast`` uses on CPUs with native bf16), transformers in float32
(the goal's baseline), transformers under the same autocast (the same-precision comparison) and stele
in float32 (today's comparison), and prints the ratios. It says whether the CPU has native bf16
(``pipeline.train.cpu_bf16_native``: AVX512-BF16/AMX on x86); without it bf16 is emulated and slower.
Goal (issue 22): stele bf16 >= 1.25x transformers fp32 at the paper size, at an equal loss curve;
the figures and where a bf16 step's time goes are in BENCHMARKS.md ("On the CPU, bf16 autocast").

With ``--bf16`` it also checks that bf16 leaves the loss curve alone (by default on the CPU only; on
CUDA with ``--curve-steps N``): ``--curve-steps`` AdamW steps (lr ``--curve-lr``) from the same weights
on the same fixed batches (4 random batches in turn, regression of the three outputs onto fixed random
targets, dropout off so that both compute the same function) for stele bf16, transformers float32 and,
as the yardstick of what bf16 itself moves, transformers bf16; it prints the curves and the largest
relative difference from transformers float32.
transformers' position and token-type tables have ``padding_idx=0``, which freezes their first rows;
stele's train, so for the curve stele's gradient of those rows is zeroed: then stele float32 follows
transformers float32 to 1e-7 (tiny config, 30 steps), and the difference left is bf16's.

    python bench/fusion_throughput.py                           # tiny and paper, 2 threads
    python bench/fusion_throughput.py --configs tiny --steps 50
    python bench/fusion_throughput.py --configs paper --bf16 --rounds 2       # CPU bf16 autocast
    python bench/fusion_throughput.py --device cuda --bf16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "tiny": dict(hidden_size=128, num_attention_heads=2, intermediate_size=512, l_layers=2, r_layers=2,
                 x_layers=2),
    "paper": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, l_layers=9, r_layers=5,
                  x_layers=5),
}
DEFAULT_STEPS = {"tiny": 40, "paper": 6}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
ROOT = Path(__file__).resolve().parents[1]


def hf_config(name: str, feat_dim: int):
    import transformers

    return transformers.LxmertConfig(vocab_size=30522, visual_feat_dim=feat_dim, **CONFIGS[name])


def model_flops(c, B: int, L: int, R: int) -> float:
    """Analytic FLOPs of one forward + backward of the encoder (2 per multiply-add; backward 2x)."""
    D, I, F = c.hidden_size, c.intermediate_size, c.visual_feat_dim
    tl, tr = B * L, B * R

    def layer(n: int, s: int) -> float:   # n tokens in sequences of s: qkv, scores, AV, out, FFN
        return 2 * n * (3 * D * D + 2 * s * D + D * D + 2 * D * I)

    fwd = 2 * tr * (F * D + 4 * D)                                 # visual embedding
    fwd += c.l_layers * layer(tl, L) + c.r_layers * layer(tr, R)
    cross = (2 * tl * D * D + 2 * tr * 2 * D * D + 4 * tl * R * D + 2 * tl * D * D     # lang -> vision
             + 2 * tr * D * D + 2 * tl * 2 * D * D + 4 * tr * L * D + 2 * tr * D * D)  # vision -> lang
    fwd += c.x_layers * (cross + layer(tl, L) + layer(tr, R))
    fwd += 2 * B * D * D                                           # pooler
    return 3 * fwd


# ------------------------------------------------------------------------------ worker (one process)


def worker(spec: dict) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from fusion.models.hf_weights import config_from_hf, load_hf_lxmert_state
    from fusion.models.lxmert import Lxmert

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = hf_config(spec["config"], spec["feat_dim"])
    if spec.get("curve_steps"):   # the loss curve: dropout off, so both compute the same function
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    state = load_file(spec["weights"])
    if spec["impl"] == "transformers":
        model = transformers.LxmertModel(cfg)
        model.load_state_dict(state)
    else:
        model = Lxmert(config_from_hf(cfg))
        missing, unexpected = model.load_state_dict(load_hf_lxmert_state(state), strict=False)
        assert not unexpected and all(k.startswith(("mlm_head", "region_", "itm", "text_proj", "media_proj",
                                                    "logit_scale")) for k in missing), (missing, unexpected)
    del state
    model.to(device).train()

    g = torch.Generator().manual_seed(1)
    B, L, R = spec["batch"], spec["tokens"], spec["regions"]
    ids = torch.randint(1000, cfg.vocab_size, (B, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    attn = (torch.arange(L)[None] < lengths[:, None]).long()
    feats = torch.randn(B, R, cfg.visual_feat_dim, generator=g).relu()
    corners = torch.rand(B, R, 2, 2, generator=g).sort(2).values       # (B, R, min/max, x/y)
    boxes = corners.reshape(B, R, 4)                                     # x1, y1, x2, y2
    region_mask = torch.ones(B, R, dtype=torch.long)
    ids, attn, feats, boxes, region_mask = (t.to(device) for t in (ids, attn, feats, boxes, region_mask))

    def forward(ids, attn, feats, boxes, region_mask):
        if spec["impl"] == "transformers":
            return model(input_ids=ids, attention_mask=attn, visual_feats=feats, visual_pos=boxes,
                         visual_attention_mask=region_mask)
        return model(ids, attn, feats, boxes, region_mask)

    if spec.get("curve_steps"):
        if spec["impl"] == "stele":   # transformers' padding_idx=0 freezes these rows; train the same
            for table in (model.embeddings.position.weight, model.embeddings.token_type.weight):
                table.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:1]), grad[1:]]))
        return {"impl": spec["impl"], "bf16": spec["bf16"],
                "losses": loss_curve(spec, model, forward, (ids, attn, feats, boxes, region_mask), device,
                                     cfg.vocab_size)}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            o = forward(ids, attn, feats, boxes, region_mask)
            loss = (o.language_output.float().square().mean() + o.vision_output.float().square().mean()
                    + o.pooled_output.float().square().mean())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        step()
    sync()
    times = []
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    out = {"impl": spec["impl"], "steps_s": spec["steps"] / wall, "wall_s": wall,
           "median_step_s": statistics.median(times), "min_step_s": min(times),
           "params": sum(p.numel() for p in model.parameters()),
           "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_name"] = torch.cuda.get_device_name()
    return out


def loss_curve(spec: dict, model, forward, first: tuple, device, vocab: int) -> list[float]:
    """``spec["curve_steps"]`` AdamW steps on 4 fixed batches in turn (the timed batch and 3 more like
    it): mean squared error of language_output, vision_output and pooled_output from fixed random
    targets (seed 2, the same for every implementation); the loss before each step."""
    import torch

    g = torch.Generator().manual_seed(2)
    ids, _, feats, _, region_mask = first
    B, L = ids.shape
    R, F, D = feats.shape[1], feats.shape[2], model_width(spec)
    batches = [first]
    for _ in range(3):
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        batches.append((torch.randint(1000, vocab, (B, L), generator=g),
                        (torch.arange(L)[None] < lengths[:, None]).long(),
                        torch.randn(B, R, F, generator=g).relu(),
                        torch.rand(B, R, 2, 2, generator=g).sort(2).values.reshape(B, R, 4),
                        region_mask.cpu()))
    batches = [tuple(t.to(device) for t in b) for b in batches]
    targets = [(torch.randn(B, L, D, generator=g).to(device), torch.randn(B, R, D, generator=g).to(device),
                torch.randn(B, D, generator=g).tanh().to(device)) for _ in batches]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["curve_lr"])
    losses = []
    for i in range(spec["curve_steps"]):
        tl, tv, tp = targets[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            o = forward(*batches[i % len(batches)])
            loss = ((o.language_output.float() - tl).square().mean()
                    + (o.vision_output.float() - tv).square().mean()
                    + (o.pooled_output.float() - tp).square().mean())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def model_width(spec: dict) -> int:
    return CONFIGS[spec["config"]]["hidden_size"]


def run_worker(spec: dict, script: str = __file__) -> dict:
    """``script --worker SPEC`` in a fresh process (its last stdout line is the result's JSON)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['impl']} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,paper", help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per implementation (default: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh processes per implementation, alternating order (a shared machine's "
                         "load drifts; steps/s is over all rounds)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--feat-dim", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast (on the CPU: stele bf16 vs transformers fp32 and bf16, plus the loss "
                         "curve check)")
    ap.add_argument("--curve-steps", type=int, default=None,
                    help="with --bf16: AdamW steps of the loss-curve check (default 30 on the CPU, 0 on "
                         "CUDA, which bench/gpu_checks.sh times; 0: skip it)")
    ap.add_argument("--curve-lr", type=float, default=1e-4)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the card for MFU (default: known cards)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch
    from safetensors.torch import save_file

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    device, bf16 = args.device, args.bf16
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: running on the CPU in float32 instead (no MFU)", flush=True)
        device, bf16 = "cpu", False
    cpu_bf16 = bf16 and device == "cpu"
    if cpu_bf16:
        sys.path.insert(0, str(ROOT))
        from pipeline.train import cpu_bf16_native

        print("CPU bf16: " + ("native (AVX512-BF16/AMX or Arm BF16)" if cpu_bf16_native() else
                              "NOT native on this CPU: oneDNN emulates it, expect bf16 slower than fp32"),
              flush=True)
    # (label, implementation, bf16 autocast); the first two make the headline ratio
    if cpu_bf16:
        variants = [("stele bf16", "stele", True), ("transformers fp32", "transformers", False),
                    ("transformers bf16", "transformers", True), ("stele fp32", "stele", False)]
    else:
        variants = [("stele", "stele", bf16), ("transformers", "transformers", bf16)]

    import transformers

    work = Path(tempfile.mkdtemp(prefix="stele-lxmert-bench-"))
    rows = []
    print(f"batch {args.batch}, {args.tokens} tokens, {args.regions} regions, features {args.feat_dim}-d, "
          f"{args.threads} threads, device {device}{' bf16' if bf16 else ''}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in names:
        cfg = hf_config(name, args.feat_dim)
        torch.manual_seed(0)
        hf = transformers.LxmertModel(cfg)
        weights = work / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(weights))
        n_params = sum(p.numel() for p in hf.parameters())
        del hf
        steps = args.steps or DEFAULT_STEPS[name]
        flops = model_flops(cfg, args.batch, args.tokens, args.regions)
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
        for rnd in range(args.rounds):   # alternating order, so drifting load hits both alike
            for label, impl, v_bf16 in (variants if rnd % 2 == 0 else variants[::-1]):
                spec = dict(impl=impl, config=name, weights=str(weights), steps=steps, warmup=args.warmup,
                            batch=args.batch, tokens=args.tokens, regions=args.regions,
                            feat_dim=args.feat_dim, threads=args.threads, device=device, bf16=v_bf16)
                runs[label].append(run_worker(spec))
        res = {}
        for impl, rs in runs.items():
            wall = sum(r["wall_s"] for r in rs)
            r = {"impl": impl, "steps_s": steps * len(rs) / wall, "wall_s": wall,
                 "median_steps_s": 1 / statistics.median(x["median_step_s"] for x in rs),
                 "rss_mib": max(x["rss_mib"] for x in rs), "params": rs[0]["params"]}
            r["tokens_s"] = r["steps_s"] * args.batch * args.tokens
            r["gflop_s"] = r["steps_s"] * flops / 1e9
            extra = ""
            if device == "cuda":
                r["gpu_mib"], r["gpu_name"] = max(x["gpu_mib"] for x in rs), rs[0]["gpu_name"]
                peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                                 if k in r["gpu_name"]), None)
                r["mfu"] = None if peak is None else r["gflop_s"] / (peak * 1e3)
                extra = (f", {r['gpu_name']}, GPU peak {r['gpu_mib']:.0f} MiB"
                         + (f", MFU {r['mfu'] * 100:.1f}%" if r["mfu"] is not None
                            else " (MFU: pass --peak-tflops)"))
            res[impl] = r
            print(f"{name:<6} {impl:<17} {r['steps_s']:8.3f} steps/s ({r['median_steps_s']:.3f} from the "
                  f"median step) {r['tokens_s']:8.0f} tokens/s {r['gflop_s']:7.1f} GFLOP/s  peak RSS "
                  f"{r['rss_mib']:6.0f} MiB  ({steps * len(rs)} steps in {wall:.1f} s){extra}", flush=True)
        (top, _, _), (base, _, _) = variants[:2]
        ratio = res[top]["steps_s"] / res[base]["steps_s"]
        ratio_med = res[top]["median_steps_s"] / res[base]["median_steps_s"]
        print(f"{name:<6} {n_params / 1e6:.1f}M parameters (LxmertModel), {flops / 1e9:.1f} GFLOP per "
              f"forward+backward step; {top} / {base}: {ratio:.2f}x steps/s ({ratio_med:.2f}x by the "
              f"median step), {res[top]['rss_mib'] / res[base]['rss_mib']:.2f}x peak RSS; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        ratios = {}
        if cpu_bf16:
            for a, b in (("stele bf16", "transformers fp32"), ("stele bf16", "transformers bf16"),
                         ("stele fp32", "transformers fp32"), ("stele bf16", "stele fp32"),
                         ("transformers bf16", "transformers fp32")):
                ratios[f"{a} / {b}"] = (res[a]["steps_s"] / res[b]["steps_s"],
                                        res[a]["median_steps_s"] / res[b]["median_steps_s"])
                print(f"{name:<6} {a + ' / ' + b:<40} {ratios[f'{a} / {b}'][0]:.2f}x steps/s "
                      f"({ratios[f'{a} / {b}'][1]:.2f}x by the median step)", flush=True)
        curves = {}
        curve_steps = args.curve_steps if args.curve_steps is not None else 30 if device == "cpu" else 0
        if bf16 and curve_steps > 0:
            for label, impl, v_bf16 in (("stele bf16", "stele", True),
                                        ("transformers fp32", "transformers", False),
                                        ("transformers bf16", "transformers", True)):
                spec = dict(impl=impl, config=name, weights=str(weights), steps=0, warmup=0, batch=args.batch,
                            tokens=args.tokens, regions=args.regions, feat_dim=args.feat_dim,
                            threads=args.threads, device=device, bf16=v_bf16, curve_steps=curve_steps,
                            curve_lr=args.curve_lr)
                curves[label] = run_worker(spec)["losses"]
                print(f"{name:<6} loss curve {label:<17} " + " ".join(f"{x:.4f}" for x in curves[label]),
                      flush=True)
            ref = curves["transformers fp32"]
            for label in ("stele bf16", "transformers bf16"):
                rel = max(abs(a - b) / abs(b) for a, b in zip(curves[label], ref))
                print(f"{name:<6} loss curve {label} vs transformers fp32: max relative difference "
                      f"{rel:.2e} over {curve_steps} AdamW steps (fp32: first {ref[0]:.4f}, last "
                      f"{ref[-1]:.4f})", flush=True)
        rows.append({"config": name, "params": n_params, "gflop_per_step": flops / 1e9, "ratio": ratio,
                     "ratio_median_step": ratio_med, "ratios": ratios, "loss_curves": curves,
                     **res})
        weights.unlink()
    print(json.dumps({"args": vars(args), "device": device, "bf16": bf16, "rows": rows}))


if __name__ == "__main__":
    main()
