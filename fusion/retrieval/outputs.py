"""The files a retrieval evaluation writes besides ``metrics.json``: per-query ranks
(``ranks.parquet``), the recall@K and rank plots, and a few example queries with their top results
(``examples.json``, image thumbnails as data URIs) for the run report."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion.retrieval.scorer import DIRECTIONS

from fusion.retrieval.params import RetrievalParams
from pipeline.plots import legend_below


@dataclass
class Listing:
    """What the output files name: the text queries' ids and texts, the media items' ids and a
    text for each (its first caption), ``audio``: the text side is spoken clips (media queries)."""

    text_ids: list[str]
    texts: list[str | None]
    media_ids: list[str]
    media_texts: list[str | None]
    audio: bool = False

    @classmethod
    def of(cls, caps: Any, bank: Any) -> Listing:
        media_text: dict[int, str] = {}
        for c, m in zip(caps.texts, caps.media):
            media_text.setdefault(m, c)
        return cls(list(caps.ids), list(caps.texts), list(bank.ids),
                   [media_text.get(m) for m in range(len(bank))], caps.bank is not None)


def recall_curve(ranks: dict[str, np.ndarray], n: int) -> dict[str, list]:
    ks = sorted({*range(1, min(n, 10) + 1), *np.unique(np.geomspace(1, max(n, 1), 40).astype(int)).tolist()})
    curve: dict[str, list] = {"K": ks}
    for d, r in ranks.items():
        r = r[~np.isnan(r)]
        curve[d] = [float((r <= k).mean() * 100) if len(r) else None for k in ks]
    return curve


def write_ranks(path: Path, listing: Listing, results: dict[str, Any],
                 first_ranks: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list] = {c: [] for c in ("direction", "query_id", "rank", "first_stage_rank",
                                             "top_ids", "top_scores")}
    for d, q_ids, c_ids in (("text_to_media", listing.text_ids, listing.media_ids),
                            ("media_to_text", listing.media_ids, listing.text_ids)):
        res = results[d]
        for i, q in enumerate(q_ids):
            rows["direction"].append(d)
            rows["query_id"].append(q)
            rows["rank"].append(None if np.isnan(res.ranks[i]) else float(res.ranks[i]))
            rows["first_stage_rank"].append(None if np.isnan(first_ranks[d][i]) else float(first_ranks[d][i]))
            rows["top_ids"].append([c_ids[j] for j in res.top_indices[i].tolist()])
            rows["top_scores"].append(res.top_scores[i].tolist())
    pq.write_table(pa.table(rows), path)


def plots(result: dict, ranks: dict[str, np.ndarray], out: Path, params: RetrievalParams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = params.mode + (f" k={params.k}" if params.mode == "rerank" else "")
    curve = result["recall_curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for d in DIRECTIONS:
        ax.plot(curve["K"], curve[d], marker=".", label=f"{d.replace('_', ' ')}")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    legend_below(ax, ncols=2)
    ax.set_title(f"retrieval ({label}), {result['counts']['captions']} captions x "
                 f"{result['counts']['media']} media")
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    top = max(2.0, max(float(np.nanmax(r)) if np.isfinite(r).any() else 1.0 for r in ranks.values()))
    bins = np.unique(np.geomspace(1, top + 1, 30))
    for d in DIRECTIONS:
        r = ranks[d][~np.isnan(ranks[d])]
        ax.hist(r, bins=bins, alpha=0.6, label=d.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("rank of the first correct item")
    ax.set_ylabel("queries")
    legend_below(ax, ncols=2)
    ax.set_title(f"rank histogram ({label}); per-query ranks in ranks.parquet")
    fig.tight_layout()
    fig.savefig(out / "rank_hist.png", dpi=110)
    plt.close(fig)


def examples_of(media_dir: Path | None, listing: Listing, scores: Any, relevance: Any,
              params: RetrievalParams, log: Any, top: int = 5) -> list[dict]:
    """A few queries per direction (spread over the query list, reproducibly) with their top
    results: captions as text, images as thumbnails, audio clips by their first caption."""
    import torch

    if params.examples == 0:
        return []
    thumbs = Thumbnails(media_dir, log) if params.thumbnails and media_dir is not None else None

    def media_entry(m: int) -> dict:
        return {"id": listing.media_ids[m], "text": listing.media_texts[m],
                "thumbnail": thumbs.get(listing.media_ids[m]) if thumbs else None}

    def text_entry(t: int) -> dict:
        entry = {"id": listing.text_ids[t], "text": listing.texts[t]}
        return entry if not listing.audio else {**entry, "kind": "audio"}

    out = []
    for d, rel, q_entry, c_entry in (("text_to_media", relevance, text_entry, media_entry),
                                     ("media_to_text", relevance.T, media_entry, text_entry)):
        n = scores.n_queries(d)
        picks = np.unique(np.linspace(0, n - 1, min(params.examples, n)).astype(int))
        for q in picks.tolist():
            row = scores.rows(d, slice(q, q + 1))[0]
            correct = rel.dense(slice(q, q + 1))[0]
            order = torch.argsort(row, descending=True)[:top].tolist()
            out.append({"direction": d, "query": q_entry(q),
                        "results": [{**c_entry(c), "score": float(row[c]),
                                     "correct": bool(correct[c])} for c in order]})
    return out


class Thumbnails:
    """64-pixel PNG data URIs of image items, read through the dataset the feature artifact was
    built from (its manifest's parameters); none for audio, or when the media is gone."""

    def __init__(self, media_dir: Path, log: Any, size: int = 64):
        import pyarrow.parquet as pq

        self.size, self.log, self.dataset, self.failed = size, log, None, 0
        manifest = json.loads((media_dir / "manifest.json").read_text())
        spec = manifest.get("params", {}).get("dataset")
        items = pq.read_table(media_dir / "items.parquet", columns=["id", "media"])
        self.ref = dict(zip(items["id"].to_pylist(), items["media"].to_pylist()))
        try:
            from pipeline.datasets import build_dataset

            ds = build_dataset(spec)
            self.dataset = ds if ds.modality == "image" else None
        except Exception as e:  # noqa: BLE001 - thumbnails are a nicety: say why, go on without
            log.warning("no thumbnails: the dataset %r cannot be opened (%s)", spec, e)

    def get(self, item_id: str) -> str | None:
        if self.dataset is None:
            return None
        try:
            from PIL import Image

            img = Image.open(io.BytesIO(self.dataset.load(self.ref[item_id])))
            img = img.convert("RGBA")
            img.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        except Exception as e:  # noqa: BLE001
            self.failed += 1
            self.log.warning("no thumbnail for %s: %s", item_id, e)
            return None
