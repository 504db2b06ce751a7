"""Knowledge encoders compared on the same backbone, data and steps: plain MLM vs ERNIE vs K-BERT vs
K-Adapter vs KEPLER vs KG-BERT vs SenseBERT vs LIBERT vs KnowBERT vs WKLM vs SentiLR, pretraining
tokens/s and downstream accuracy / micro-F1 / macro-F1, mean +- std over seeds.

The data is ``pipelines/wiki_knowledge.yaml``'s (WordNet + countryinfo KG, TransE vectors, the linked
Wikipedia summaries from ``$STELE_DATA``); this script writes one pipeline with every pretraining and
fine-tuning stage and runs it with ``stele``:

1. the shared stages (KG, TransE, links) once;
2. each pretraining alone (``--until``), one after the other, so tokens/s are not measured while
   another job shares the cores;
3. every fine-tuning stage: 5 tasks x seeds x encoders. Two tasks read the linked documents
   (entity typing, relation classification), three only the KG (``fusion.finetune.kg_tasks``:
   triple classification, lexical relation prediction on word pairs, supersense tagging on
   WordNet's usage examples). ``backbone`` is MiniLM fine-tuned with no further pretraining;
   ``plain`` is MiniLM after the same MLM steps the others get (the fair baseline). K-Adapter's
   factual adapter is evaluated on the fact tasks (relations, triples, word pairs), its lexical
   adapter on the type tasks (typing, supersenses), and both were pretrained with fine-tuning's test
   entities / pairs held out (the same split), so no adapter saw a test label of the tasks split by
   entity or pair. KEPLER and KG-BERT train on the KG's triples with the triples of fine-tuning's
   test entity pairs left out (``held_out_share``, the same split), so neither trained on a test
   pair's relation or triple. The lexical tasks split by word, which no held-out entity pair
   covers: the stages warn where a pretraining saw their labels (KEPLER, KG-BERT and LIBERT on the
   word pairs), and the table reads those cells as upper bounds.

What the other new encoders read (their knowledge is the WordNet half of the same KG, whose
lexnames and relations are also labels of the tasks): SenseBERT's input carries, in fine-tuning
as in pretraining, each word's allowed supersenses (the lexnames of the synsets it, or its base form,
is a one-word lemma of), which for a one-word WordNet mention include its typing label, and for a
supersense target its label among the word's senses (the label itself where the word has one
supersense), test words too: that is the model, as K-BERT's injected triples are, not a held-out
split. LIBERT's
synonym / hypernym pairs come from all of WordNet (its recipe has no held-out option), so a test
pair labelled ``_hypernym`` may be among them. KG-BERT reads triples, not documents: ``--docs`` does
not cap it (the first N triples would be one source's); its corpus is every training triple, and it
trains on ``steps x batch`` of them in the corpus stream's seeded order. KnowBERT, as ERNIE, reads
the TransE vectors (trained on the KG's train triples, test pairs' among them) of every linked
mention's alias candidates, in fine-tuning as in pretraining: that is its input, not a held-out
split; on triple classification, where both entities are given, those vectors were fitted to most
test triples (TransE holds out only the KG's own 1% test split), so ERNIE's and KnowBERT's triple
scores are upper bounds. On the two lexical tasks the dictionary linker (``knowledge.link``'s
defaults) finds the entities in the words and usage examples: its prior picks a sense, which for
the two words of a synonym pair is often the same synset, and the TransE vectors of linked synsets
were fitted to the triples behind the word pairs' labels; K-BERT injects no triple between synsets
of a pair's words. WKLM swaps mentions for names of same-type entities (test entities among them)
and fine-tunes as plain MLM. SentiLR reads only the text, with the VADER lexicon of ``vaderSentiment``
(``stele[sentiment]``); encyclopedic text has few polar words: its pretraining and fine-tuning
manifests count the words in and out of the lexicon.

Fine-tuning cost. One run is ``--finetune-steps`` batches of 16 plus scoring the test split, which
grows with ``--docs`` (500 documents: 2,177 typing test examples at 64 wordpieces), so
``--max-test-examples`` (default 1000) caps the test split to a sample fixed by the split seed: the
same examples for every encoder and seed, reported next to what was available. Fine-tuning reads
``--finetune-max-length`` wordpieces (default 64; spans beyond are left out and counted) and runs
``--finetune-jobs`` stages at once (default 2, one thread each: Ray gives a 1-CPU task one thread).

    STELE_DATA=/path/to/data python bench/knowledge_encoders.py                 # 200 steps, 3 seeds
    STELE_DATA=/path/to/data python bench/knowledge_encoders.py --steps 20 --seeds 1 --docs 300
    STELE_DATA=/path/to/data python bench/knowledge_encoders.py --steps 1 --seeds 1 --plan   # runs nothing
    STELE_DATA=/path/to/data python bench/knowledge_encoders.py --encoders backbone,kgbert --tasks triples

The table is printed and written to ``<store>/knowledge_encoders.json`` (a subset's to a name that
says which); cached stages are reused
when the script runs again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STELE = str(Path(sys.executable).parent / "stele")
ENCODERS = ("backbone", "plain", "ernie", "kbert", "kadapter", "kepler", "kgbert", "sensebert", "libert",
            "knowbert", "wklm", "sentilr")
PRETRAININGS = ("plain", "ernie", "kbert", "kadapter_factual", "kadapter_lexical", "kepler", "kgbert",
                "sensebert", "libert", "knowbert", "wklm", "sentilr")
TASKS = {"entity_typing": "typing", "relation_classification": "relations",
         "triple_classification": "triples", "lexical_relation": "lexical", "supersense": "supersense"}
UNITS = {"typing": "entities", "relations": "entity pairs", "triples": "entity pairs",
         "lexical": "words (both of a pair)", "supersense": "lemmas"}
# K-Adapter's adapter per task: the factual one (relations of entity pairs) for the fact tasks,
# the lexical one (lexnames) for the type tasks
ADAPTER = {"typing": "kadapter_lexical", "supersense": "kadapter_lexical", "relations": "kadapter_factual",
           "triples": "kadapter_factual", "lexical": "kadapter_factual"}


def build_pipeline(args: argparse.Namespace) -> dict:
    base = yaml.safe_load((ROOT / "pipelines" / "wiki_knowledge.yaml").read_text().replace(
        "!data wiki/summaries_en.jsonl", str(Path(os.environ["STELE_DATA"]) / "wiki" / "summaries_en.jsonl")))
    stages = {k: base["stages"][k] for k in ("kg", "transe", "links")}
    stages["transe"]["with"]["epochs"] = args.transe_epochs
    pre = {"steps": args.steps, "batch_size": args.batch, "max_length": args.max_length,
           "limit_docs": args.docs, "warmup_steps": max(1, args.steps // 10),
           "checkpoint_every": args.steps}
    held = {"held_out_share": args.test_share, "split_seed": 0}
    stages["plain"] = {"uses": "fusion.pretrain", "inputs": {"text": "links"},
                       "with": {**pre, "recipe": "mlm", "lr": 5e-5}}
    stages["ernie"] = {"uses": "fusion.pretrain", "inputs": {"text": "links", "entities": "transe"},
                       "with": {**pre, "recipe": "ernie", "lr": 1e-4}}
    stages["kbert"] = {"uses": "fusion.pretrain", "inputs": {"text": "links", "kg": "kg"},
                       "with": {**pre, "recipe": "kbert", "options": {"k": 2}}}
    for adapter in ("factual", "lexical"):
        stages[f"kadapter_{adapter}"] = {
            "uses": "fusion.pretrain", "inputs": {"text": "links", "kg": "kg"},
            "with": {**pre, "recipe": "kadapter", "lr": 1e-4,
                     "options": {"adapter": adapter, **held}}}
    stages["kepler"] = {"uses": "fusion.pretrain", "inputs": {"text": "links", "kg": "kg"},
                        "with": {**pre, "recipe": "kepler", "options": held}}
    # KG-BERT's rows are triples (limit_docs would keep the file's first N, one source's): no cap
    stages["kgbert"] = {"uses": "fusion.pretrain", "inputs": {"kg": "kg"},
                        "with": {**{k: v for k, v in pre.items() if k != "limit_docs"},
                                 "recipe": "kgbert", "options": held}}
    for lexical in ("sensebert", "libert"):  # the KG's WordNet half is their lexicon
        stages[lexical] = {"uses": "fusion.pretrain", "inputs": {"text": "links", "kg": "kg"},
                           "with": {**pre, "recipe": lexical}}
    # KnowBERT's KAR layer starts random, as ERNIE's K-Encoder: ERNIE's learning rate
    stages["knowbert"] = {"uses": "fusion.pretrain",
                          "inputs": {"text": "links", "entities": "transe", "kg": "kg"},
                          "with": {**pre, "recipe": "knowbert", "lr": 1e-4}}
    stages["wklm"] = {"uses": "fusion.pretrain", "inputs": {"text": "links", "kg": "kg"},
                      "with": {**pre, "recipe": "wklm"}}
    stages["sentilr"] = {"uses": "fusion.pretrain", "inputs": {"text": "links"},
                         "with": {**pre, "recipe": "sentilr"}}
    ft = {"steps": args.finetune_steps, "batch_size": 16, "max_length": args.finetune_max_length,
          "limit_docs": args.docs, "test_share": args.test_share, "split_seed": 0,
          "max_train_examples": args.max_train_examples, "max_test_examples": args.max_test_examples}
    for task, short in tasks_of(args).items():
        for seed in range(args.seeds):
            for enc in args.encoders:
                # the KG tasks read no document
                inputs = {"text": "links", "kg": "kg"} if short in ("typing", "relations") else {"kg": "kg"}
                if enc != "backbone":
                    inputs["encoder"] = ADAPTER[short] if enc == "kadapter" else enc
                lr = 1e-3 if enc == "kadapter" else 5e-5  # adapters + head on a frozen backbone
                stages[f"ft_{short}_{enc}_s{seed}"] = {
                    "uses": "fusion.finetune", "inputs": inputs,
                    "with": {**ft, "task": task, "seed": seed, "lr": lr,
                             "head_lr": args.finetune_head_lr}}
    return {"name": "knowledge_encoders", "stages": stages}


def tasks_of(args: argparse.Namespace) -> dict[str, str]:
    return {task: short for task, short in TASKS.items() if short in args.tasks}


def names(known: tuple[str, ...]):
    """argparse type: a comma-separated subset of ``known``."""
    def parse(value: str) -> tuple[str, ...]:
        chosen = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in chosen if v not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"{unknown or value!r}: choose from {', '.join(known)}")
        return chosen
    return parse


def stele(*argv: str) -> float:
    """Run ``stele``; returns the wall seconds."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    subprocess.run([STELE, *argv, "--no-live"], check=True, env=env)
    return time.perf_counter() - t0


def manifests(path: Path, store: str) -> dict[str, dict]:
    from pipeline.runner import plan
    from pipeline.spec import load_pipeline
    from pipeline.store import ArtifactStore

    st = ArtifactStore(store)
    planned = plan(load_pipeline(str(path)), st)
    return {name: st.manifest(p.key) for name, p in planned.items() if st.is_complete(p.key)}


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(ROOT / "stele-store-bench"))
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps, every encoder")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--docs", type=int, default=2000, help="first N Wikipedia summaries")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--finetune-head-lr", type=float, default=1e-3,
                    help="the new classification head's learning rate, the same for every "
                         "encoder (their own: 5e-5, K-Adapter's adapter 1e-3)")
    ap.add_argument("--finetune-max-length", type=int, default=64,
                    help="fine-tuning wordpieces (pretraining: --max-length)")
    ap.add_argument("--max-train-examples", type=int, default=None,
                    help="cap on training examples per run (a fixed sample; default: all)")
    ap.add_argument("--max-test-examples", type=int, default=1000,
                    help="cap on test examples per run (a fixed sample, the same for every run)")
    ap.add_argument("--finetune-jobs", type=int, default=2,
                    help="fine-tuning stages at once (the local Ray's logical CPUs)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--encoders", type=names(ENCODERS), default=ENCODERS,
                    help="fine-tune only these (comma-separated; every pretraining still runs)")
    ap.add_argument("--tasks", type=names(tuple(TASKS.values())), default=tuple(TASKS.values()),
                    help="only these tasks (comma-separated short names)")
    ap.add_argument("--test-share", type=float, default=0.2)
    ap.add_argument("--transe-epochs", type=int, default=10)
    ap.add_argument("--plan", action="store_true",
                    help="write the pipeline and show its plan (stele plan: stages, what is "
                         "cached); run nothing")
    args = ap.parse_args()
    if not os.environ.get("STELE_DATA"):
        sys.exit("set STELE_DATA to the folder holding wiki/summaries_en.jsonl and wordnet/")
    spec = Path(args.store) / "knowledge_encoders.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump(build_pipeline(args), sort_keys=False))
    store = ["--store", args.store]
    if args.plan:
        env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
        sys.exit(subprocess.run([STELE, "plan", str(spec), *store], env=env).returncode)
    wall = {}
    for name in ("links", "transe", *PRETRAININGS):
        wall[name] = round(stele("run", str(spec), *store, "--until", name), 1)
    wall["finetuning"] = round(stele("run", str(spec), *store, "--num-cpus",
                                     str(args.finetune_jobs)), 1)
    print(f"wall seconds (cached stages take ~0): {wall}")

    m = manifests(spec, args.store)
    table: dict = {"settings": vars(args), "wall_s": wall, "pretraining": {}, "downstream": {},
                   "sizes": {}}
    print(f"\npretraining: {args.steps} steps x batch {args.batch} x {args.max_length} tokens, "
          f"first {args.docs} summaries (kgbert: all training triples), MiniLM backbone, one worker, "
          f"each run alone; the losses are each recipe's own total, not comparable across rows")
    print(f"{'encoder':18} {'tokens/s':>9} {'first loss':>11} {'last-10 loss':>13}")
    for name in PRETRAININGS:
        x = m[name]["metrics"]
        key = "total"
        row = {"tokens_per_s": x["tokens_per_s"], "loss_first": x.get(f"loss_{key}_first"),
               "loss_last10": x.get(f"loss_{key}_last10")}
        table["pretraining"][name] = row
        print(f"{name:18} {row['tokens_per_s']:9.0f} {row['loss_first']:11.3f} "
              f"{row['loss_last10']:13.3f}")
    for task, short in tasks_of(args).items():
        print(f"\n{task}: test split = held-out {UNITS[short]} "
              f"({args.test_share:.0%}), {args.finetune_steps} fine-tuning steps, {args.seeds} seed(s)")
        print(f"{'encoder':10} {'accuracy':>16} {'micro-F1':>16} {'macro-F1':>16}")
        for enc in args.encoders:
            runs = [m[f"ft_{short}_{enc}_s{s}"]["metrics"] for s in range(args.seeds)
                    if f"ft_{short}_{enc}_s{s}" in m]
            cells = {k: [r[f"test_{k}"] for r in runs] for k in ("accuracy", "micro_f1", "macro_f1")}
            table["downstream"].setdefault(task, {})[enc] = cells
            print(f"{enc:10} {mean_std(cells['accuracy']):>16} {mean_std(cells['micro_f1']):>16} "
                  f"{mean_std(cells['macro_f1']):>16}")
        sizes = next(iter(r for k, r in m.items() if k.startswith(f"ft_{short}_")), None)
        if sizes:  # the same for every encoder and seed (the stage's split and caps)
            x = sizes["metrics"]
            table["sizes"][task] = {k: x[k] for k in (
                "train_examples", "train_examples_available", "test_examples",
                "test_examples_available", "train_units", "test_units", "num_labels")}
            train_counts, test_counts = (x["label_counts"][k] for k in ("train", "test"))
            majority = max(train_counts, key=train_counts.get)
            table["sizes"][task]["majority_label_accuracy"] = (
                test_counts.get(majority, 0) / sum(test_counts.values()))
            print(f"  (majority training label {majority!r}: test accuracy "
                  f"{table['sizes'][task]['majority_label_accuracy']:.3f})")
            print(f"  ({x['train_examples']} of {x['train_examples_available']} training / "
                  f"{x['test_examples']} of {x['test_examples_available']} test examples used, "
                  f"{x['test_units']} test units, "
                  f"{x['num_labels']} labels)")
        ft_s = [r["metrics"]["train_s"] + r["metrics"]["eval_s"] for k, r in m.items()
                if k.startswith(f"ft_{short}_")]
        if ft_s:
            print(f"  train + eval seconds per run: {statistics.mean(ft_s):.0f} "
                  f"(min {min(ft_s):.0f}, max {max(ft_s):.0f})")
    subset = "" if (args.encoders, tuple(tasks_of(args).values())) == (ENCODERS, tuple(TASKS.values())) \
        else f"-{'+'.join(args.encoders)}-{'+'.join(tasks_of(args).values())}"  # not the full table's
    (Path(args.store) / f"knowledge_encoders{subset}.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
