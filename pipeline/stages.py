"""The engine's own generic stage types (registered through the ``stele.stages`` entry point)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .errors import StageFailed
from .registry import stage
from .uris import ResolvedInput, URIPath, input_path, inputs_fingerprint


class SnapshotParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: ResolvedInput = Field(description="file or folder to copy into the store (relative to the "
                                            "current directory), or a URI (s3://...)")
    include: list[str] = Field(default=["**/*"], description="glob patterns inside a folder")


def _listing(params: SnapshotParams) -> list[Path | URIPath]:
    root = input_path(params.path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise StageFailed(f"core.snapshot: {root} does not exist")
    if isinstance(root, Path):
        return sorted({p for pattern in params.include for p in root.glob(pattern) if p.is_file()})
    base = root.fs_path.rstrip("/")  # fsspec's glob: ** spans folders, as pathlib's does
    return sorted({root / p[len(base) + 1:] for pattern in params.include
                   for p, info in root.fs.glob(f"{base}/{pattern}", detail=True).items()
                   if info.get("type") == "file" and p.startswith(base + "/")})


def _fingerprint(params: SnapshotParams) -> str:
    """The content of every file (size and ETag or checksum on a URI), so edited
    data invalidates the cache."""
    return inputs_fingerprint(_listing(params), root=params.path)


@stage("core.snapshot", version="1", fingerprint=_fingerprint, inputs={})
def snapshot(ctx: StageContext, params: SnapshotParams) -> dict:
    """Copy files (local or on a URI) into the store, with SHA-256 checksums, so downstream stages
    (and other nodes of a cluster) read a frozen copy, and edited files re-run everything that used
    them."""
    root = input_path(params.path)
    files = _listing(params)
    listing, total = {}, 0
    for src in ctx.progress(files, desc="copy"):
        rel = Path(src.relative_to(root)) if src != root else Path(src.name)
        dst = ctx.out / "files" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, URIPath):
            src.fs.get_file(src.fs_path, str(dst))
        else:
            shutil.copyfile(src, dst)
        listing[str(rel)] = hashlib.sha256(dst.read_bytes()).hexdigest()
        total += dst.stat().st_size
    (ctx.out / "checksums.json").write_text(json.dumps(listing, indent=1, sort_keys=True))
    return {"files": len(files), "bytes": total}
