"""The engine's own generic stage types (registered through the ``stele.stages`` entry point)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .context import StageContext
from .errors import StageFailed
from .fingerprint import files_fingerprint
from .registry import stage


class SnapshotParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="file or folder to copy into the store (relative to the current "
                                  "directory)")
    include: list[str] = Field(default=["**/*"], description="glob patterns inside a folder")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return str(Path(v).expanduser().resolve())


def _listing(params: SnapshotParams) -> list[Path]:
    root = Path(params.path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise StageFailed(f"core.snapshot: {root} does not exist")
    files = {p for pattern in params.include for p in root.glob(pattern) if p.is_file()}
    return sorted(files)


def _fingerprint(params: SnapshotParams) -> str:
    """Sizes and modification times of every file, so edited data invalidates the cache."""
    return files_fingerprint(_listing(params), root=Path(params.path))


@stage("core.snapshot", version="1", fingerprint=_fingerprint, inputs={})
def snapshot(ctx: StageContext, params: SnapshotParams) -> dict:
    """Copy local files into the store, with SHA-256 checksums, so downstream stages (and other
    nodes of a cluster) read a frozen copy, and edited files re-run everything that used them."""
    root = Path(params.path)
    files = _listing(params)
    listing, total = {}, 0
    for src in ctx.progress(files, desc="copy"):
        rel = src.relative_to(root) if src != root else Path(src.name)
        dst = ctx.out / "files" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        listing[str(rel)] = hashlib.sha256(dst.read_bytes()).hexdigest()
        total += dst.stat().st_size
    (ctx.out / "checksums.json").write_text(json.dumps(listing, indent=1, sort_keys=True))
    return {"files": len(files), "bytes": total}
