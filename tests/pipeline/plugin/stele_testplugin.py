"""Stage types for the engine's tests, installed as a third-party plugin would be: through a
``stele.stages`` entry point of a separate distribution (see conftest.make_plugin_site)."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from pipeline import StageContext, stage


class WriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = "x"
    parts: int = Field(default=3, ge=1, description="files written one after another")
    sleep: float = Field(default=0.0, ge=0, description="seconds to wait before each file")
    wait_for: str = Field(default="", description="finish only once this file exists: a gate that "
                                                  "keeps a run going until a test has acted")
    fail: bool = False


def expected(text: str, upstream: list[str]) -> str:
    """What test.write's out.txt holds: its text, then its inputs' out.txt in role order."""
    return text + "".join(f"<{u}>" for u in upstream)


@stage("test.write", version="1")
def write(ctx: StageContext, params: WriteParams) -> dict:
    """Write out.txt from the inputs' out.txt plus a text, in several slow steps."""
    upstream = [(ctx.inputs[r] / "out.txt").read_text() for r in sorted(ctx.inputs)]
    for i in ctx.progress(range(params.parts), desc="parts"):
        time.sleep(params.sleep)
        (ctx.out / f"part{i}.txt").write_text(params.text * 100)
    while params.wait_for and not os.path.exists(params.wait_for):
        time.sleep(0.05)
    if params.fail:
        raise ValueError(f"asked to fail (text={params.text!r})")
    (ctx.out / "out.txt").write_text(expected(params.text, upstream))
    print(f"wrote {params.parts} parts")  # goes to the artifact's log.txt
    return {"parts": params.parts, "pid": os.getpid()}


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 0.1


class TypedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int
    name: str = "a"
    inner: Inner = Inner()


@stage("test.typed", version="1", cpus=0)
def typed(ctx: StageContext, params: TypedParams) -> dict:
    """Records its parameters (for spec and override tests)."""
    (ctx.out / "params.json").write_text(params.model_dump_json())
    return {"dim": params.dim}
