"""stele's retrieval protocol against CLIP_benchmark's, on the same embeddings, one run.

CLIP_benchmark (LAION-AI/CLIP_benchmark, ``clip_benchmark/metrics/zeroshot_retrieval.py``) evaluates
a dual encoder by building the dense (texts x images) score matrix and a dense boolean matrix of the
positive pairs, then, for each K and each direction, in batches of 64 query rows: the top-K indices,
their one-hot expansion (batch, K, candidates), multiplied by the positives and summed, so a query
counts a hit when any correct item is in its top K. The peer below is that loop, re-implemented here
(the package needs open_clip and a dataset to run; its metric code is this).

stele evaluates the same vectors with :func:`fusion.retrieval.metrics.dual_retrieval_metrics`, as the
``fusion.retrieval`` stage does in ``mode: dual``: blocks of query rows scored from the vectors
(``block @ items.T``), relevance as index lists, realistic ranks, mAP@10 and each query's top 10
(for ranks.parquet), so it computes more than the peer (median and mean rank, mAP@10, the top lists).

The data: 5,000 random unit "image" vectors (512-d, CLIP ViT-B/32's width) and 5 captions per image,
each the image's vector plus Gaussian noise, renormalised (25,000 captions), so recall is neither 0
nor 100. Each evaluation runs in its own subprocess (fresh interpreter, same torch thread count)
that loads the saved vectors, warms up on a corner of them (imports, thread pools), times the
evaluation alone and reports its peak RSS (``ru_maxrss``), also the RSS before the evaluation (the
vectors loaded, warmed up), so the evaluation's own memory shows. R@1/5/10
of both directions must be identical (asserted; tie-free random data, where every tie convention
agrees). Goal (issue 25): stele's wall time <= 0.5x the peer's, and flat driver memory.

    python bench/retrieval_protocols.py                     # about a minute on a 2-core machine
    python bench/retrieval_protocols.py --images 1000 --per-image 5 --dim 256
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KS = (1, 5, 10)


def make_vectors(folder: Path, n_images: int, per_image: int, dim: int, noise: float, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n_images), per_image)
    texts = images[owner] + noise * rng.normal(size=(len(owner), dim)).astype(np.float32) / np.sqrt(dim)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    np.save(folder / "images.npy", images)
    np.save(folder / "texts.npy", texts.astype(np.float32))
    np.save(folder / "owner.npy", owner)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------- the peer
def peer_recall_at_k(scores, positives, k: int):  # noqa: ANN001, ANN201
    """CLIP_benchmark's per-query recall@k: true positives among the top k over all positives."""
    import torch

    n_queries, n_candidates = scores.shape
    top = torch.topk(scores, k, dim=1).indices                                   # (B, k)
    onehot = torch.nn.functional.one_hot(top, num_classes=n_candidates)          # (B, k, C) int64
    true_pos = (onehot * positives.view(n_queries, 1, n_candidates)).sum(dim=(1, 2))
    return true_pos / positives.sum(dim=1)


def peer_in_batches(fn, scores, positives, batch_size: int, **kw):  # noqa: ANN001, ANN201
    import torch

    return torch.cat([fn(scores[s:s + batch_size], positives[s:s + batch_size], **kw)
                      for s in range(0, len(scores), batch_size)])


def peer_evaluate(texts, images, owner, batch_size: int = 64) -> dict[str, float]:  # noqa: ANN001
    """CLIP_benchmark's ``evaluate`` after the embeddings: dense scores and positives, R@K as
    "recall > 0" per query, both directions."""
    import torch

    scores = texts @ images.T                                                    # (T, M)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(scores)), owner] = True
    out = {}
    for k in KS:
        out[f"text_to_media_R@{k}"] = (peer_in_batches(peer_recall_at_k, scores, positives, batch_size, k=k)
                                       > 0).float().mean().item() * 100
        out[f"media_to_text_R@{k}"] = (peer_in_batches(peer_recall_at_k, scores.T, positives.T, batch_size,
                                                       k=k) > 0).float().mean().item() * 100
    return out


# ----------------------------------------------------------------------------------- stele
def stele_evaluate(texts, images, owner) -> dict[str, float]:  # noqa: ANN001
    from fusion.retrieval.metrics import Relevance, dual_retrieval_metrics

    rel = Relevance.from_index_pairs(range(len(texts)), owner, len(texts), len(images))
    m = dual_retrieval_metrics(texts, images, rel, top=10)
    return {f"{d}_{name}": m[d][name] for d in ("text_to_media", "media_to_text")
            for name in (*(f"R@{k}" for k in KS), "median_rank", "mAP@10")}


def child(which: str, folder: Path) -> None:
    """One evaluation in this fresh process; prints JSON."""
    import numpy as np
    import torch

    texts = torch.from_numpy(np.load(folder / "texts.npy"))
    images = torch.from_numpy(np.load(folder / "images.npy"))
    owner = torch.from_numpy(np.load(folder / "owner.npy"))
    evaluate = (lambda t, i, o: stele_evaluate(t, i, o.numpy())) if which == "stele" else peer_evaluate
    # Warm-up on a corner of the data, outside the measurement: imports, torch's thread pools and
    # their buffers, so that the time and the memory measured are the evaluation's own.
    corner = owner[:50] < 10
    evaluate(texts[:50][corner], images[:10], owner[:50][corner])
    before = _rss_mib()
    t0 = time.perf_counter()
    metrics = evaluate(texts, images, owner)
    wall = time.perf_counter() - t0
    print(json.dumps({"which": which, "wall_s": wall, "rss_before_mib": before, "peak_rss_mib": _rss_mib(),
                      "threads": torch.get_num_threads(), "metrics": metrics}))


def run_child(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--folder", str(folder)],
                         capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{which} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=6.0,
                    help="caption noise (its norm; the image vector's is 1): R@1 about 50%% by default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", choices=["stele", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_vectors(folder, args.images, args.per_image, args.dim, args.noise, args.seed)
        peer, stele = run_child("peer", folder), run_child("stele", folder)
    T, M = args.images * args.per_image, args.images
    same = {k: (stele["metrics"][k], peer["metrics"][k]) for k in peer["metrics"]}
    # the same hits: one query is 100 / 25,000 = 0.004 points; below 1e-4 is float32 rounding of the %
    differ = {k: v for k, v in same.items() if abs(v[0] - v[1]) > 1e-4}
    assert not differ, f"R@K differ (stele, peer): {differ}"
    ratio = stele["wall_s"] / peer["wall_s"]
    print(f"{T:,} captions x {M:,} images, {args.dim}-d, torch threads {stele['threads']} (os cpus "
          f"{os.cpu_count()})")
    print("R@1/5/10 identical: " + ", ".join(
        f"{d} " + "/".join(f"{stele['metrics'][f'{d}_R@{k}']:.2f}" for k in KS)
        for d in ("text_to_media", "media_to_text")))
    sm = stele["metrics"]
    print(f"stele also: median rank t2m {sm['text_to_media_median_rank']:.1f} / m2t "
          f"{sm['media_to_text_median_rank']:.1f}, mAP@10 t2m {sm['text_to_media_mAP@10']:.2f} / m2t "
          f"{sm['media_to_text_mAP@10']:.2f}")
    for r, name in ((peer, "CLIP_benchmark-style"), (stele, "stele")):
        print(f"{name:>21}: {r['wall_s']:7.2f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB "
              f"(vectors loaded: {r['rss_before_mib']:.0f} MiB; the evaluation's own: "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB)")
    print(f"stele / peer wall time: {ratio:.3f}x (goal <= 0.5x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"captions": T, "images": M, "dim": args.dim, "peer": peer,
                                              "stele": stele, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
