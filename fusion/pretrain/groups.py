"""``group_by``: which group each item of a feature artifact belongs to, read from its listing's
``meta`` (the media recipes' option; :func:`fusion.pretrain.corpus.grouped_order` batches by it)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipeline import StageFailed


def group_of(items: pq.ParquetFile, field: str) -> dict[str, str]:
    """item id -> the string of its ``meta[field]``, for the items that have it."""
    out = {}
    for batch in items.iter_batches(columns=["id", "meta"]):
        for i, meta in zip(batch.column("id").to_pylist(), batch.column("meta").to_pylist()):
            value = json.loads(meta).get(field) if meta else None
            if value is not None:
                out[i] = str(value)
    return out


def check_group_field(items: pq.ParquetFile, field: str, where: str) -> None:
    """Fail before training when no item's meta has ``field`` (a misspelt field would make every
    item a group of its own); reads the listing a batch at a time, up to the first item that has it."""
    seen: set[str] = set()
    for batch in items.iter_batches(columns=["meta"]):
        for meta in batch.column("meta").to_pylist():
            fields = json.loads(meta) if meta else {}
            if fields.get(field) is not None:
                return
            seen.update(fields)
    raise StageFailed(f"fusion.pretrain: group_by {field!r}: no item of {where} has that meta field "
                      f"(fields seen: {sorted(seen) or 'none'})")
