"""Text-media pairs from a feature artifact: what the multimodal recipes train on and what
``fusion.retrieval`` evaluates.

A feature artifact (``vision.features``, ``speech.features``; layout in :mod:`pipeline.features`)
holds each usable item's regions and ``items.parquet`` with every listed item's texts. A *pair* is
one text of one item with that item's media: an image and each of its captions, a spoken clip and
its transcript. Items whose media was rejected have no features and give no pair; they are counted
(``items_without_features``), as are items without any text.

The split is by media item (:class:`fusion.splits.MediaSplit`): the dataset's own split where the
items carry one (``meta["split"]``: Karpathy's ``test`` is its 1k / 5k test set), else stele's hash
split of the item id. The same item is held out in pretraining and in evaluation, and a caption
never trains while its image is tested; the ``fusion.retrieval`` stage reads the model's
``held_out_share``, ``split_seed`` and ``split_source`` (:func:`split_source_for`) so both sides
agree without the user repeating them. The counts say which split was used (``split_source``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import StageFailed

from fusion.splits import MediaSplit, SplitSource


@dataclass
class MediaBank:
    """Every item's regions, flat: ``features`` (sum R_i, F) float16, ``boxes`` (sum R_i, 4)
    float32, item i's rows ``offsets[i]:offsets[i + 1]``. Flat numpy arrays so one ``ray.put``
    shares them with every worker without a copy."""

    ids: list[str]
    features: np.ndarray
    boxes: np.ndarray
    offsets: np.ndarray
    max_regions: int | None = None

    @classmethod
    def load(cls, path: str | Path, ids: Sequence[str] | None = None,
             max_regions: int | None = None) -> MediaBank:
        """The items of the feature artifact at ``path``: those in ``ids``, in that order (ids without
        features are left out), or all of them in the shards' order, keeping at most
        ``max_regions`` regions each (the first: a global token stays). The shards' order is the
        order the feature stage's actors finished in, which differs between runs: callers that
        train or rank pass ``ids`` in the listing's order."""
        from pipeline.features import FeatureSet

        want = None if ids is None else set(ids)
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i, f, b in FeatureSet(Path(path)):
            if want is None or i in want:
                n = len(f) if max_regions is None else min(len(f), max_regions)
                rows[i] = (f[:n], b[:n])
        out_ids = list(rows) if ids is None else [i for i in ids if i in rows]
        feats = [rows[i][0] for i in out_ids]
        boxes = [rows[i][1] for i in out_ids]
        counts = [len(f) for f in feats]
        dim = FeatureSet(Path(path)).dim
        return cls(out_ids,
                   np.concatenate(feats) if feats else np.zeros((0, dim), np.float16),
                   np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), max_regions)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items ``index`` padded to their largest region count: ``features`` (B, R, F) float16,
        ``boxes`` (B, R, 4), ``region_mask`` (B, R) bool."""
        n = [int(self.offsets[i + 1] - self.offsets[i]) for i in index]
        B, R = len(index), max(n, default=0)
        features = torch.zeros(B, R, self.dim, dtype=torch.float16)
        boxes = torch.zeros(B, R, 4, dtype=torch.float32)
        region_mask = torch.zeros(B, R, dtype=torch.bool)
        for b, (i, k) in enumerate(zip(index, n)):
            s = int(self.offsets[i])
            features[b, :k] = torch.from_numpy(np.ascontiguousarray(self.features[s:s + k]))
            boxes[b, :k] = torch.from_numpy(np.ascontiguousarray(self.boxes[s:s + k]))
            region_mask[b, :k] = True
        return {"features": features, "boxes": boxes, "region_mask": region_mask}


@dataclass
class Captions:
    """The queries: one row per text of a feature artifact's items, ``ids`` (``<item id>#<k>``),
    ``texts``, ``media`` (the index of the correct item in the :class:`MediaBank`). For media
    queries (spoken captions searching images, :func:`load_media_pairs`), ``bank`` holds the
    query items' own regions (row i = query i) and ``texts`` only label them."""

    ids: list[str]
    texts: list[str]
    media: list[int]
    bank: MediaBank | None = None


def load_pairs(path: str | Path, split: str = "all", held_out_share: float = 0.0,
               split_seed: int = 0, max_regions: int | None = None,
               limit: int | None = None, split_source: SplitSource = "dataset"
               ) -> tuple[MediaBank, Captions, dict[str, Any]]:
    """The media of one split and their captions, plus counts for the manifest, in the order the
    dataset listed the items (``items.parquet``), so that two runs over the same items train and
    rank alike. ``limit`` keeps the first N media items of the split.

    ``split``: ``all``, or a split name: the dataset's own (``train``, ``val``, ``test``, ...) where
    the items carry one and ``split_source`` is ``"dataset"``, else the hash split's ``train`` /
    ``test`` (``held_out_share``, ``split_seed``). A name that can select nothing (not among the
    dataset's splits; ``val`` under the hash split) is a :class:`~pipeline.StageFailed` naming the
    artifact and the splits it has."""
    from fusion.compat import artifact_name

    items = pq.read_table(Path(path) / "items.parquet", columns=["id", "texts", "meta"])
    ids = items["id"].to_pylist()
    texts_of = dict(zip(ids, items["texts"].to_pylist()))
    splits = MediaSplit.of_listing(ids, items["meta"].to_pylist(), held_out_share, split_seed,
                                   split_source)
    try:
        splits.check(split, f"features artifact {artifact_name(path)}")
    except ValueError as e:
        raise StageFailed(str(e)) from None
    featured = set(feature_ids(path))
    chosen = [i for i in texts_of if i in featured and splits.contains(i, split)]
    if limit is not None:
        chosen = chosen[:limit]
    bank = MediaBank.load(path, chosen, max_regions)
    caps = Captions([], [], [])
    without_text = 0
    for m, item in enumerate(bank.ids):
        texts = texts_of.get(item) or []
        without_text += not texts
        for k, t in enumerate(texts):
            caps.ids.append(f"{item}#{k}")
            caps.texts.append(t)
            caps.media.append(m)
    counts = {"items_listed": items.num_rows, "items_with_features": len(featured),
              "items_without_features": items.num_rows - len(featured), **splits.counts(),
              f"{split}_items": len(bank), f"{split}_items_without_text": without_text,
              f"{split}_texts": len(caps.texts)}
    return bank, caps, counts


def own_split_items(path: str | Path, split: str) -> tuple[set[str], dict[str, Any]]:
    """The ids of a feature artifact's items in ``split`` of the dataset's own split, and the split
    counts: what precomputed vectors and scores from elsewhere are narrowed to. They have no held-out
    split of stele's, so an artifact whose items carry none, or no item of ``split``, is a
    :class:`~pipeline.StageFailed` naming the artifact and the splits it has."""
    from fusion.compat import artifact_name

    items = pq.read_table(Path(path) / "items.parquet", columns=["id", "meta"])
    ids = items["id"].to_pylist()
    splits = MediaSplit.of_listing(ids, items["meta"].to_pylist())
    where = f"features artifact {artifact_name(path)}"
    if splits.source != "dataset":
        raise StageFailed(f"split {split!r}: the items of {where} carry no split of their own (no meta "
                          f"'split'), and precomputed vectors or scores have no held-out split of "
                          f"stele's: use split all, or a dataset with its own split")
    try:
        splits.check(split, where)
    except ValueError as e:
        raise StageFailed(str(e)) from None
    return {i for i in ids if splits.contains(i, split)}, splits.counts()


def split_source_for(model_dir: str | Path, recipe: dict[str, Any], media_dir: str | Path
                     ) -> SplitSource:
    """The ``split_source`` to evaluate a ``fusion.pretrain`` model with on a feature artifact, so
    that no item it trained on is tested: the model's own (``options.split_source``) on the artifact
    it was trained on, the dataset's own split where there is one on any other artifact. A model
    pretrained before the datasets' splits were used (no ``split_source`` in ``recipe.json``) trained
    on the hash split. Which artifact it trained on: ``recipe.json``'s ``features.media.key``, else
    the model artifact's manifest; when neither is known, the model's own."""
    import json

    trained = (recipe.get("options") or {}).get("split_source", "hash")
    if trained == "dataset":
        return "dataset"

    def manifest(folder: str | Path) -> dict[str, Any]:
        f = Path(folder) / "manifest.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    on = ((recipe.get("features") or {}).get("media") or {}).get("key") or \
        manifest(model_dir).get("inputs", {}).get("media")
    here = manifest(media_dir).get("key")
    return "dataset" if on and here and on != here else trained


def feature_ids(path: str | Path) -> list[str]:
    """The ids of a feature artifact's items that have features, without decoding any."""
    from pipeline.features import FeatureSet

    return [i for shard in FeatureSet(Path(path)).shards
            for i in pq.read_table(shard, columns=["id"])["id"].to_pylist()]


def load_media_pairs(query_path: str | Path, media_path: str | Path, split: str = "all",
                     held_out_share: float = 0.0, split_seed: int = 0, key: str = "base_id",
                     max_regions: int | None = None, limit: int | None = None,
                     split_source: SplitSource = "dataset"
                     ) -> tuple[MediaBank, Captions, dict[str, Any]]:
    """Media queries for media items: each item of the query artifact (e.g. ``speech.features`` of
    ``spoken_captions``) whose ``meta[key]`` names an item of the media artifact (``base_id``: the
    image whose caption was spoken) is a query for that item. The split is the *media* item's
    (:func:`load_pairs`), so a held-out image's spoken captions are held out with it. Queries whose
    key is missing or names no media item with features are counted, never silently dropped."""
    import json

    bank, _, counts = load_pairs(media_path, split, held_out_share, split_seed, max_regions, limit,
                                 split_source)
    index = {m: i for i, m in enumerate(bank.ids)}
    items = pq.read_table(Path(query_path) / "items.parquet", columns=["id", "texts", "meta"])
    featured = set(feature_ids(query_path))
    all_media = set(feature_ids(media_path))
    wanted: dict[str, tuple[int, str]] = {}
    no_key = unknown = no_features = other_split = 0
    for qid, texts, meta in zip(items["id"].to_pylist(), items["texts"].to_pylist(),
                                items["meta"].to_pylist()):
        target = json.loads(meta or "{}").get(key)
        if qid not in featured:
            no_features += 1
        elif target is None:
            no_key += 1
        elif target not in all_media:
            unknown += 1
        elif target not in index:
            other_split += 1
        else:
            wanted[qid] = (index[target], (texts or [qid])[0])
    qbank = MediaBank.load(query_path, list(wanted), max_regions)
    caps = Captions(list(qbank.ids), [wanted[q][1] for q in qbank.ids], [wanted[q][0] for q in qbank.ids],
                    qbank)
    counts |= {"query_items_listed": items.num_rows, "queries": len(caps.ids),
               "queries_without_features": no_features, f"queries_without_{key}": no_key,
               "queries_for_unknown_media": unknown, "queries_of_other_split": other_split,
               "media_without_query": len(bank) - len(set(caps.media))}
    return bank, caps, counts
