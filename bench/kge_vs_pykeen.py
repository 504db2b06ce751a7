"""KG embedding training, stele vs PyKEEN, same settings, interleaved in one run.

For each (dataset, model): PyKEEN's ``pipeline`` (sLCWA, basic negative sampler) and stele's
``knowledge.ingest -> knowledge.embed -> knowledge.evaluate`` pipeline, each in a fresh process, one
after the other, with the same model, dimension, epochs, negatives per positive, batch size,
optimizer and learning rate, no early stopping, CPU. Both evaluate the final model on the test split
with the filtered, both-sided, realistic-rank protocol (the two evaluators agree to 1e-6 on equal
scores: tests/knowledge/test_evaluate.py).

Reported per run: training wall time (PyKEEN's ``train_seconds``; stele's training loop time, summed
per epoch, and the whole embed stage including Ray Train start-up), the median epoch of each (robust
to bursts of load on a shared machine), test MRR and Hits@10, and the ratios. The same model on
both sides: PyKEEN's ComplEx draws the real and imaginary parts of its embeddings from N(0, 1) and
adds an L2 regulariser (weight 0.01), so stele's ComplEx gets the same (``init: normal``,
``regularization: 0.01``; ``--complex-init default`` gives stele its PyG default, Xavier, and
``--complex-regularization 0`` drops the regulariser on both sides); PyKEEN's TransE projects
entity vectors after each step, which stele's does with ``--entity-norm 2`` (without it: PyG's
TransE, entities normalised inside the score).

    pip install -e '.[bench]'
    python bench/kge_vs_pykeen.py                        # Nations, Kinships, UMLS x TransE, RotatE, ComplEx
    python bench/kge_vs_pykeen.py --datasets kinships --models transe --epochs 100
    python bench/kge_vs_pykeen.py --pykeen-benchmark     # PyKEEN's published TransE/Kinships setting
    python bench/kge_vs_pykeen.py --models complex --datasets umls --entity-norm 2 --seeds 0,1,2,3,4
    STELE_DATA=../shared/data python bench/kge_vs_pykeen.py --wordnet --optimizer sparse_adam

``--wordnet``: issue 23's setting, ``pipelines/wordnet_kge.yaml``'s graph and RotatE (dim 128, 16
negatives, batch 1024, lr 0.005). stele's ``knowledge.ingest`` builds the graph and its seeded
split once; its three splits are written as TSV files that both sides then read (PyKEEN as a
path dataset, stele through the ``triples`` source), so both train and filter on the same triples.
``--optimizer`` changes stele's side only: PyKEEN's embeddings have dense gradients, so Adam it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
STELE = str(Path(PY).parent / "stele")
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
           PYSTOW_HOME=tempfile.mkdtemp(prefix="pystow-"))
ENV.pop("RAY_ADDRESS", None)

PYKEEN = """
import json, sys, time
import torch
from pykeen.pipeline import pipeline
from pykeen.training.callbacks import TrainingCallback
cfg = json.loads(sys.argv[1])
if cfg.get("pykeen_malloc_tuning"):  # the glibc settings stele's training workers use
    from pipeline.ray_utils import tune_malloc
    assert tune_malloc()

class EpochEnds(TrainingCallback):
    ends = []
    def post_epoch(self, epoch, epoch_loss, **kwargs):
        self.ends.append(time.perf_counter())

torch.set_num_threads(cfg["threads"])
names = {"transe": "TransE", "rotate": "RotatE", "complex": "ComplEx", "distmult": "DistMult"}
model_kwargs = {"embedding_dim": cfg["dim"]}
if cfg["model"] == "transe":
    model_kwargs["scoring_fct_norm"] = cfg["p_norm"]
if cfg["model"] == "complex":  # PyKEEN's default LpRegularizer, with the weight given
    model_kwargs["regularizer_kwargs"] = {"weight": cfg["regularization"], "p": 2.0, "normalize": True}
loss, loss_kwargs = {"margin": ("marginranking", {"margin": cfg["margin"]}),
                     "self_adversarial": ("nssa", {"margin": cfg["margin"],
                                                   "adversarial_temperature": cfg["temperature"]}),
                     "bce": ("softplus", {})}[cfg["loss"]]
t = time.perf_counter()
files = cfg.get("files")
if files:  # our own split, as TSV paths (entity ids from the training file). PyKEEN's evaluator
    # broadcasts (queries x entities x dim) for RotatE, over an hour per evaluation on WordNet
    # here: its pipeline evaluates one test triple and stele's evaluator the real test set below
    data = {"training": files["train"], "validation": files["valid"], "testing": files["test_one"]}
else:
    data = {"dataset": cfg["dataset"].capitalize() if cfg["dataset"] != "umls" else "UMLS"}
r = pipeline(**data,
             model=names[cfg["model"]], model_kwargs=model_kwargs, loss=loss, loss_kwargs=loss_kwargs,
             training_loop="sLCWA", negative_sampler="basic",
             negative_sampler_kwargs={"num_negs_per_pos": cfg["negatives"]},
             optimizer="Adam", optimizer_kwargs={"lr": cfg["lr"]},
             training_kwargs={"num_epochs": cfg["epochs"], "batch_size": cfg["batch_size"],
                              "use_tqdm": False, "callbacks": [EpochEnds()]},
             evaluator_kwargs={"filtered": True}, evaluation_kwargs={"use_tqdm": False},
             random_seed=cfg["seed"], device="cpu")
m = r.metric_results
metrics = {"mrr": m.get_metric("both.realistic.inverse_harmonic_mean_rank"),
           "hits@10": m.get_metric("both.realistic.hits_at_10")}
if files:  # the trained RotatE as stele's full-candidate scorer, checked against PyKEEN's scores
    from pykeen.triples import TriplesFactory
    from knowledge.evaluate import rank_metrics
    from knowledge.scoring import CandidateScorer, _cmul
    tf = r.training
    def mapped(path):
        return TriplesFactory.from_path(path, entity_to_id=tf.entity_to_id,
                                        relation_to_id=tf.relation_to_id).mapped_triples
    test = mapped(files["test"])
    known = torch.cat([tf.mapped_triples, mapped(files["valid"]), test])
    with torch.no_grad():
        ent = r.model.entity_representations[0](indices=None)       # complex (E, d)
        rel = r.model.relation_representations[0](indices=None)     # complex, unit modulus
        scorer = CandidateScorer(
            candidates=torch.cat([ent.real, ent.imag], -1),
            tail_query=lambda h, r_: _cmul(rel.real[r_], rel.imag[r_], ent.real[h], ent.imag[h]),
            head_query=lambda r_, t_: _cmul(rel.real[r_], -rel.imag[r_], ent.real[t_], ent.imag[t_]),
            kind="distance", p=2.0, exact=True)
        h, rr, tt = test[:64].T
        mine = scorer.tails(h, rr).gather(1, tt[:, None]).squeeze(1)
        theirs = r.model.score_hrt(test[:64]).squeeze(1)
        assert torch.allclose(mine, theirs, atol=1e-4), (mine[:4], theirs[:4])
        res = rank_metrics(scorer, test, known, tf.num_entities, num_relations=tf.num_relations)
    metrics = {"mrr": res["filtered"]["both"]["mrr"], "hits@10": res["filtered"]["both"]["hits@10"],
               "evaluator": "stele"}
epochs = sorted(b - a for a, b in zip(EpochEnds.ends, EpochEnds.ends[1:]))
print(json.dumps({"train_s": r.train_seconds, "total_s": time.perf_counter() - t,
                  "median_epoch_s": epochs[len(epochs) // 2] if epochs else None, **metrics}))
"""

DEFAULT_LOSS = {"transe": "margin", "distmult": "bce", "complex": "bce", "rotate": "self_adversarial"}
DEFAULT_MARGIN = {"transe": 1.0, "rotate": 9.0, "complex": 1.0, "distmult": 1.0}


def run_pykeen(cfg: dict) -> dict:
    proc = subprocess.run([PY, "-c", PYKEEN, json.dumps(cfg)], env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pykeen failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_stele(cfg: dict, work: Path) -> dict:
    store = work / f"store-{cfg['dataset']}-{cfg['model']}-{time.time_ns()}"
    embed = {"model": cfg["model"], "dim": cfg["dim"], "p_norm": cfg["p_norm"], "margin": cfg["margin"],
             "entity_norm": cfg.get("entity_norm"),
             "loss": cfg["loss"], "adversarial_temperature": cfg["temperature"],
             "negatives": cfg["negatives"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
             "epochs": cfg["epochs"], "eval_every": 0, "patience": 0, "seed": cfg["seed"],
             "regularization": cfg.get("regularization", 0.0), "init": cfg.get("init", "default"),
             "optimizer": cfg.get("optimizer", "adam"), "eval_batch_size": 256,
             "scaling": {"cpus_per_worker": cfg["threads"]}}
    source = ({"type": "triples", "splits": {k: v for k, v in cfg["files"].items() if k != "test_one"}}
              if cfg.get("files")
              else {"type": "pykeen", "dataset": cfg["dataset"]})
    spec = {"name": "bench", "stages": {
        "kg": {"uses": "knowledge.ingest", "with": {"sources": [source]}},
        "embed": {"uses": "knowledge.embed", "inputs": ["kg"], "with": embed},
        "eval": {"uses": "knowledge.evaluate", "inputs": {"kg": "kg", "model": "embed"}},
    }}
    yaml_path = work / "bench.yaml"
    yaml_path.write_text(json.dumps(spec))  # JSON is YAML
    t = time.perf_counter()
    proc = subprocess.run([STELE, "run", str(yaml_path), "--store", str(store), "--no-live"],
                          env=ENV, capture_output=True, text=True)
    total = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"stele failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out, epochs = {}, []
    for art in (store / "artifacts").iterdir():
        m = json.loads((art / "manifest.json").read_text())
        out[m["stage"]] = m
        if m["stage"] == "embed":
            epochs = sorted(e["epoch_s"] for e in json.loads((art / "history.json").read_text()))
    return {"train_s": out["embed"]["metrics"]["train_loop_s"], "stage_s": out["embed"]["wall_s"],
            "median_epoch_s": epochs[len(epochs) // 2],
            "total_s": total, "mrr": out["eval"]["metrics"]["mrr"],
            "hits@10": out["eval"]["metrics"]["hits@10"]}


def wordnet_files(work: Path) -> dict[str, str]:
    """WordNet with WN18RR's relations and ``pipelines/wordnet_kge.yaml``'s split, built by stele's
    ingest stage and written as one TSV of (head, relation, tail) ids per split."""
    import numpy as np

    from knowledge.kg import KnowledgeGraph

    store = work / "wordnet-prep"
    spec = {"name": "wordnet_prep", "stages": {"kg": {"uses": "knowledge.ingest", "with": {
        "sources": [{"type": "wordnet", "relations": "wn18rr"}],
        "split": {"valid": 0.01, "test": 0.01, "seed": 0}}}}}
    (work / "prep.yaml").write_text(json.dumps(spec))
    proc = subprocess.run([STELE, "run", str(work / "prep.yaml"), "--store", str(store), "--no-live"],
                          env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"WordNet ingest failed (is STELE_DATA set?):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    (art,) = [a for a in (store / "artifacts").iterdir() if (a / "triples.parquet").exists()]
    kg = KnowledgeGraph.load(art)
    ents, rels = np.array(kg.entity_ids(), dtype=object), np.array(kg.relation_ids(), dtype=object)
    files = {}
    for split in ("train", "valid", "test"):
        t = kg.split_array(split)
        files[split] = str(work / f"wordnet-{split}.tsv")
        with open(files[split], "w") as f:
            f.writelines(f"{h}\t{r}\t{o}\n" for h, r, o in zip(ents[t[:, 0]], rels[t[:, 1]], ents[t[:, 2]]))
        print(f"wordnet {split}: {len(t):,} triples", flush=True)
    files["test_one"] = str(work / "wordnet-test-one.tsv")  # what PyKEEN's own evaluator gets
    with open(files["test"]) as f, open(files["test_one"], "w") as one:
        one.write(f.readline())
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="nations,kinships,umls")
    ap.add_argument("--models", default="transe,rotate,complex")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--negatives", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds (overrides --seed): every setting once per seed, "
                         "then the means per dataset and model. On these small test sets one run's "
                         "MRR moves by ~0.05 with the seed, PyKEEN's as much as stele's")
    ap.add_argument("--transe-norm", type=float, default=1.0,
                    help="TransE distance norm for both. PyG normalises entities with the same norm "
                         "(p=1: L1-normalised), PyKEEN always L2-normalises them: only p=2 is the "
                         "same model in both")
    ap.add_argument("--complex-regularization", type=float, default=0.01,
                    help="ComplEx's L2 regulariser weight, both sides (PyKEEN's default 0.01)")
    ap.add_argument("--pykeen-malloc-tuning", action="store_true",
                    help="give PyKEEN's process the glibc malloc settings of stele's workers "
                         "(pipeline.ray_utils.tune_malloc)")
    ap.add_argument("--complex-init", choices=["normal", "default"], default="normal",
                    help="stele's ComplEx initialisation: normal = PyKEEN's, default = PyG's Xavier")
    ap.add_argument("--entity-norm", type=float, default=None,
                    help="stele's TransE: normalise entities in this norm (2 = PyKEEN's model)")
    ap.add_argument("--optimizer", default="adam",
                    choices=["adam", "adagrad", "sparse_adam", "rowwise_adagrad"],
                    help="stele's optimiser (PyKEEN: Adam always)")
    ap.add_argument("--wordnet", action="store_true",
                    help="issue 23's setting: WordNet (STELE_DATA) x RotatE, wordnet_kge.yaml's "
                         "hyper-parameters; --epochs and --seeds still apply")
    ap.add_argument("--pykeen-benchmark", action="store_true",
                    help="PyKEEN's benchmarking TransE config on Kinships: dim 256, L1, "
                         "self-adversarial, 38 negatives, batch 512, lr 1.07e-3, 350 epochs")
    args = ap.parse_args()

    configs = []
    for seed in ([int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]):
        configs += settings(args, seed)
    work = Path(tempfile.mkdtemp(prefix="stele-kge-bench-"))
    rows = []
    try:
        files = wordnet_files(work) if args.wordnet else None
        for cfg in configs:
            cfg.update(pykeen_malloc_tuning=args.pykeen_malloc_tuning, optimizer=args.optimizer)
            if files:
                cfg["files"] = files
        for cfg in configs:  # interleaved: PyKEEN then stele for each setting
            rows.append(compare(cfg, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    means = seed_means(rows) if args.seeds else []
    print(json.dumps({"config": vars(args), "rows": rows, "means": means}))


def settings(args: argparse.Namespace, seed: int) -> list[dict]:
    """The configurations one seed runs: PyKEEN's benchmarking one, or dataset x model."""
    configs = []
    if args.pykeen_benchmark:
        configs.append(dict(dataset="kinships", model="transe", dim=256, p_norm=1.0, loss="self_adversarial",
                            margin=9.0, temperature=1.0, negatives=38, batch_size=512, lr=1.07e-3,
                            epochs=350, threads=args.threads, seed=seed,
                            entity_norm=args.entity_norm))
    elif args.wordnet:
        configs.append(dict(dataset="wordnet", model="rotate", dim=128, p_norm=1.0, loss="self_adversarial",
                            margin=DEFAULT_MARGIN["rotate"], temperature=1.0, negatives=16,
                            batch_size=1024, lr=0.005, epochs=args.epochs, threads=args.threads,
                            seed=seed, entity_norm=None))
    else:
        for ds in args.datasets.split(","):
            for model in args.models.split(","):
                configs.append(dict(dataset=ds, model=model, dim=args.dim, p_norm=args.transe_norm,
                                    loss=DEFAULT_LOSS[model], margin=DEFAULT_MARGIN[model],
                                    temperature=1.0, negatives=args.negatives,
                                    batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                                    threads=args.threads, seed=seed,
                                    entity_norm=args.entity_norm,
                                    regularization=args.complex_regularization
                                    if model == "complex" else 0.0,
                                    init=args.complex_init if model == "complex" else "default"))
    return configs


def compare(cfg: dict, work: Path) -> dict:
    """PyKEEN, then stele, on one configuration; prints and returns the row."""
    pk = run_pykeen(cfg)
    st = run_stele(cfg, work)
    row = {"dataset": cfg["dataset"], "model": cfg["model"], "seed": cfg["seed"], "pykeen": pk,
           "stele": st, "train_ratio": st["train_s"] / pk["train_s"],
           "stage_ratio": st["stage_s"] / pk["train_s"],
           # bursts of load from other tenants of a shared machine hit one side and not the
           # other: the median epoch is the robust figure
           "epoch_ratio": (st["median_epoch_s"] / pk["median_epoch_s"]  # None: under 2 epochs
                           if pk["median_epoch_s"] else None),
           "d_mrr": st["mrr"] - pk["mrr"], "d_hits10": st["hits@10"] - pk["hits@10"]}
    print(f"{cfg['dataset']:<9} {cfg['model']:<8} seed {cfg['seed']} pykeen train "
          f"{pk['train_s']:7.1f}s MRR {pk['mrr']:.3f} H@10 {pk['hits@10']:.3f} | stele loop "
          f"{st['train_s']:6.1f}s (stage {st['stage_s']:6.1f}s) MRR {st['mrr']:.3f} "
          f"H@10 {st['hits@10']:.3f} | loop/pykeen {row['train_ratio']:.2f}x stage/pykeen "
          f"{row['stage_ratio']:.2f}x median epoch {row['epoch_ratio'] or float('nan'):.2f}x "
          f"dMRR {row['d_mrr']:+.3f} dH@10 {row['d_hits10']:+.3f}", flush=True)
    return row


def seed_means(rows: list[dict]) -> list[dict]:
    """Per dataset and model, over seeds: mean MRR and Hits@10 of each side, their differences,
    and the median loop/PyKEEN time ratio; printed as a table."""
    from statistics import mean, median

    out = []
    print("\nmeans over seeds")
    for key in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        rs = [r for r in rows if (r["dataset"], r["model"]) == key]
        m = {"dataset": key[0], "model": key[1], "seeds": [r["seed"] for r in rs],
             **{f"{side}_{k}": mean(r[side][k] for r in rs)
                for side in ("pykeen", "stele") for k in ("mrr", "hits@10")},
             "train_ratio_median": median(r["train_ratio"] for r in rs)}
        m["d_mrr"], m["d_hits10"] = (m["stele_mrr"] - m["pykeen_mrr"],
                                     m["stele_hits@10"] - m["pykeen_hits@10"])
        out.append(m)
        print(f"{key[0]:<9} {key[1]:<8} {len(rs)} seeds | MRR pykeen {m['pykeen_mrr']:.3f} stele "
              f"{m['stele_mrr']:.3f} ({m['d_mrr']:+.3f}) | H@10 pykeen {m['pykeen_hits@10']:.3f} "
              f"stele {m['stele_hits@10']:.3f} ({m['d_hits10']:+.3f}) | loop/pykeen median "
              f"{m['train_ratio_median']:.2f}x", flush=True)
    return out


if __name__ == "__main__":
    main()
