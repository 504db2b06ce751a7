"""KEPLER beside TransE and RotatE under KG-BERT's capped protocol (issue 27), on the artifacts of
``pipelines/wordnet_text_kge.yaml``: each model ranks, per query, the target among ``--cap``
candidates drawn by :func:`fusion.models.kgbert.rank_candidates` (the function and seed
``fusion.link_prediction`` ranks KG-BERT with), filtered against train + valid + test, on

  S1 = the first ``--limit`` test triples (``kgbert_lp``'s set: the candidates KG-BERT's filtered
       pass ranks), and
  S2 = the first ``--limit`` test triples with an end held out of KEPLER's KE loss (inductive).

KEPLER's entity vectors are computed as ``fusion.link_prediction`` computes them (fp32), but only
for the entities the candidate lists name. Prints MRR and Hits@1/3/10 per model and set, split by
whether the answer / the given end was held out, and writes the ranks to ``--out``.

    python bench/text_kge_capped.py --store /tmp/wn_text_store
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion.models.kepler import description_batch  # noqa: E402
from fusion.models.kgbert import rank_candidates  # noqa: E402
from fusion.pretrain.knowledge_recipes import entity_texts, tokenize_entity  # noqa: E402
from fusion.pretrain.loop import load_pretrained  # noqa: E402
from fusion.splits import split_of  # noqa: E402
from knowledge.kg import KnowledgeGraph, read_table  # noqa: E402
from knowledge.models import load_model  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--store", required=True, help="the store wordnet_text_kge.yaml ran in (local)")
ap.add_argument("--limit", type=int, default=100, help="test triples per set")
ap.add_argument("--cap", type=int, default=100, help="candidates per query besides the target")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="text_kge_capped.json")
args = ap.parse_args()
torch.set_num_threads(1)
by = {}   # stage -> (artifact folder, manifest): the newest artifact of each stage name
for m in sorted(Path(args.store, "artifacts").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime):
    j = json.loads(m.read_text())
    by[j["stage"]] = (m.parent, j)
LIMIT, CAP, SEED = args.limit, args.cap, args.seed
kg_uri = str(by["wordnet"][0])
kg = KnowledgeGraph.load(kg_uri)
test_all, known = kg.split_tensor("test"), kg.split_tensor()
opt_p = by["kepler"][1]["params"]["options"]
ids = read_table(kg_uri, "entities", ["id"])["id"].to_pylist()
held = np.array([split_of(i, opt_p["held_out_entities"], opt_p.get("split_seed", 0)) == "test" for i in ids])
ta = test_all.numpy()
sel2 = np.flatnonzero(held[ta[:, 0]] | held[ta[:, 2]])[:LIMIT]
sets = {"S2_inductive": test_all[torch.from_numpy(sel2)], "S1_first": test_all[:LIMIT]}
common = dict(num_entities=kg.num_entities, cap=CAP, seed=SEED, candidates=np.arange(kg.num_entities),
              num_relations=kg.num_relations)

_, opt, backbone, kep, _ = load_pretrained(by["kepler"][0])
names, descs, _ = entity_texts(kg_uri, opt.entity_text)
tok, cache = backbone.tokenizer, {}
rel = kep.relations.weight.detach().float()

@torch.no_grad()
def kepler_score(tr):
    need = [e for e in dict.fromkeys(tr[:, [0, 2]].reshape(-1).tolist()) if e not in cache]
    for i in range(0, len(need), 16):
        chunk = need[i:i + 16]
        b = description_batch([tokenize_entity(tok, names[e], descs[e], opt.entity_text,
                                               opt.description_length) for e in chunk], tok.pad_token_id)
        for e, v in zip(chunk, kep.entity_vectors(*b).float()):
            cache[e] = v
    h = torch.stack([cache[e] for e in tr[:, 0].tolist()])
    t = torch.stack([cache[e] for e in tr[:, 2].tolist()])
    return -torch.linalg.vector_norm(h + rel[tr[:, 1]] - t, kep.config.p, dim=-1)

kge = {st: load_model(by[st][0]) for st in ("transe", "rotate")}
out = {}
for sname, test in sets.items():
    tt = test.numpy()
    pred_held = np.concatenate([held[tt[:, 0]], held[tt[:, 2]]])    # head queries, then tail queries
    given_held = np.concatenate([held[tt[:, 2]], held[tt[:, 0]]])
    for mname in ("transe", "rotate", "kepler"):
        if mname == "kepler":
            score = kepler_score
        else:
            m = kge[mname]
            score = lambda tr, m=m: m(tr[:, 0], tr[:, 1], tr[:, 2]).detach()  # noqa: E731
        c, w = time.process_time(), time.time()
        with torch.no_grad():
            res = rank_candidates(score, test, known, **common)
        r = res["ranks"]["rank"]
        rec = {"cpu_s": round(time.process_time() - c, 1), "wall_s": round(time.time() - w, 1),
               "entities_encoded": len(cache), "ranks": r.tolist(),
               "pred_held": pred_held.tolist(), "given_held": given_held.tolist(),
               "candidates_mean": float(res["ranks"]["candidates"].mean())}
        for g, s in (("all", np.ones(len(r), bool)), ("pred_held", pred_held),
                     ("given_held_only", given_held & ~pred_held), ("none_held", ~pred_held & ~given_held)):
            rr = r[s]
            rec[g] = {"queries": int(s.sum()),
                      **({"mrr": float((1 / rr).mean()), "h1": float((rr <= 1).mean()),
                          "h3": float((rr <= 3).mean()), "h10": float((rr <= 10).mean())} if s.any() else {})}
        out.setdefault(sname, {})[mname] = rec
        print(sname, mname, {k: v for k, v in rec.items()
                             if k not in ("ranks", "pred_held", "given_held")}, flush=True)
        Path(args.out).write_text(json.dumps(out))
