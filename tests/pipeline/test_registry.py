"""Stage registry: decorated functions, typed parameters, warnings, third-party entry points."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.registry import NoParams, Registry, stage

from ..conftest import make_plugin_site, stele


class P(BaseModel):
    dim: int = 4


def test_decorator_infers_params_and_resources() -> None:
    reg = Registry(_loaded=True)

    @stage("demo.thing", version="3", cpus=0, gpus=1, registry=reg)
    def thing(ctx, params: P) -> None:
        """Does a thing.

        More text."""

    st = reg.get("demo.thing")
    assert st.params is P and st.version == "3" and st.fn is thing
    assert st.resources.cpus == 0 and st.resources.gpus == 1
    assert st.description == "Does a thing."
    assert st.parameters() == [{"name": "dim", "type": "int", "default": 4, "description": ""}]

    @stage("demo.noparams", registry=reg)
    def bare(ctx) -> None: ...

    assert reg.get("demo.noparams").params is NoParams


def test_overwriting_a_name_warns_reregistering_does_not() -> None:
    reg = Registry(_loaded=True)

    def a(ctx, params: P) -> None: ...

    def b(ctx, params: P) -> None: ...

    stage("x.y", registry=reg)(a)
    with pytest.warns(UserWarning, match="overwritten"):
        stage("x.y", registry=reg)(b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage("x.y", registry=reg)(b)  # same function again (a Ray worker re-importing): silent


def test_bad_declarations() -> None:
    with pytest.raises(ValueError, match="dotted identifiers"):
        stage("Not A Name")
    reg = Registry(_loaded=True)
    with pytest.raises(TypeError, match="pydantic model"):
        stage("x.z", registry=reg)(lambda ctx, params: None)


def test_parameter_types_read_as_yaml_values() -> None:
    from typing import Literal

    from pipeline.registry import type_name

    assert type_name(int | Literal["auto"]) == "int | 'auto'"
    assert type_name(Literal["center", "squash"] | None) == "'center' | 'squash' | None"
    assert type_name(float | None) == "float | None"
    assert type_name(tuple[int, int, int]) == "tuple[int, int, int]"
    assert type_name(P) == "P"


def test_unknown_type_suggests() -> None:
    reg = Registry(_loaded=True)
    stage("knowledge.embed", registry=reg)(lambda ctx: None)
    with pytest.raises(KeyError, match="did you mean 'knowledge.embed'"):
        reg.get("knowledge.embedd")


def test_builtin_stages_come_through_the_entry_point() -> None:
    from pipeline.registry import REGISTRY

    assert "core.snapshot" in REGISTRY.all()


def test_third_party_plugin_via_entry_point(tmp_path: Path) -> None:
    """A separate distribution adds a stage type with no edit to stele: `stele stages` lists it."""
    src = tmp_path / "src.py"
    src.write_text(
        "from pydantic import BaseModel\n"
        "from pipeline import stage\n\n"
        "class Params(BaseModel):\n"
        "    size: int = 7\n\n"
        "@stage('acme.count', version='2')\n"
        "def count(ctx, params: Params):\n"
        "    '''Counts to size.'''\n"
        "    (ctx.out / 'n.txt').write_text(str(params.size))\n")
    site = make_plugin_site(tmp_path / "acme", module_src=src, name="acme_stele")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = stele("stages", "acme.count", env=env, check=True).stdout
    assert "acme.count" in out and "v2" in out and "Counts to size." in out and "size" in out


def test_broken_plugin_is_reported_not_fatal(tmp_path: Path) -> None:
    src = tmp_path / "broken.py"
    src.write_text("raise ImportError('needs libfoo')\n")
    site = make_plugin_site(tmp_path / "b", module_src=src, name="broken_stele")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    proc = stele("stages", env=env)
    assert proc.returncode == 0
    assert "core.snapshot" in proc.stdout
    assert "broken_stele" in proc.stdout and "needs libfoo" in proc.stdout
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  a: {uses: broken.thing}\n")
    proc = stele("plan", str(p), env=env)
    assert proc.returncode == 2
    assert "plugins that failed to load: broken_stele" in proc.stderr
    assert isinstance(proc, subprocess.CompletedProcess)


def test_input_roles_are_declared_with_the_type() -> None:
    from pipeline.registry import Input

    reg = Registry(_loaded=True)

    @stage("demo.reader", registry=reg, inputs={
        "kg": Input("knowledge.ingest", "the graph"),
        "media": Input(("vision.features", "speech.features"), "features", required=False)})
    def reader(ctx) -> None: ...

    st = reg.get("demo.reader")
    assert st.inputs["media"].takes == ("vision.features", "speech.features")
    assert st.inputs["kg"].takes == ("knowledge.ingest",)
    assert st.inputs["kg"].accepts("knowledge.ingest")
    assert not st.inputs["kg"].accepts("knowledge.link") and Input(()).accepts("anything.at_all")
    assert st.input_roles() == [
        {"role": "kg", "takes": ["knowledge.ingest"], "required": True, "description": "the graph"},
        {"role": "media", "takes": ["vision.features", "speech.features"], "required": False,
         "description": "features"}]
    stage("demo.legacy", registry=reg)(reader)
    assert reg.get("demo.legacy").inputs is None  # not declared: not checked


def test_bad_input_role_declarations() -> None:
    from pipeline.registry import Input

    reg = Registry(_loaded=True)
    with pytest.raises(ValueError, match="stage type names"):
        Input("not a type")
    with pytest.raises(ValueError, match="must be an identifier"):
        stage("x.a", registry=reg, inputs={"no-dash": Input("x.b")})(lambda ctx: None)
    with pytest.raises(TypeError, match=r"must be an Input\(...\)"):
        stage("x.a", registry=reg, inputs={"kg": "knowledge.ingest"})(lambda ctx: None)
    with pytest.raises(TypeError, match="mapping role -> Input"):
        stage("x.a", registry=reg, inputs=[Input("x.b")])(lambda ctx: None)


def test_builtin_stage_types_declare_their_input_roles() -> None:
    """stele's own types all declare their roles, and every type a role takes exists."""
    from pipeline.registry import REGISTRY

    types = REGISTRY.all()
    ours = ("pipeline", "knowledge", "vision", "speech", "fusion")
    builtin = {n: st for n, st in types.items() if st.fn.__module__.split(".")[0] in ours}
    assert {"core.snapshot", "knowledge.embed", "fusion.pretrain", "fusion.retrieval"} <= set(builtin)
    for name, st in builtin.items():
        assert st.inputs is not None, f"{name} declares no input roles"
        for role, spec in st.inputs.items():
            assert spec.help, f"{name}.{role} has no description"
            for t in spec.takes:
                assert t in types, f"{name}.{role} takes unknown stage type {t!r}"
    assert builtin["knowledge.evaluate"].inputs["model"].takes == ("knowledge.embed",)
    # a recipe's needs are checked when the stage starts: at the stage level every role is optional
    assert not any(i.required for i in builtin["fusion.pretrain"].inputs.values())
