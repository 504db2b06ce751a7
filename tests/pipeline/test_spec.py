"""Spec validation: every bad input is one line naming file, line and field; exit 2; nothing runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.cli import main
from pipeline.errors import SpecError
from pipeline.spec import load_pipeline, parse_pipeline

GOOD = """\
name: good
stages:
  a:
    uses: test.write
    with: {text: A}
  b:
    uses: test.typed
    inputs: [a]
    with:
      dim: 3
      inner: {lr: 0.5}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_pipeline_is_typed(test_stages: None) -> None:
    p = parse_pipeline(GOOD, file="good.yaml")
    assert list(p.stages) == ["a", "b"]
    b = p.stages["b"]
    assert b.params.dim == 3 and b.params.inner.lr == 0.5 and b.params.name == "a"
    assert b.inputs == {"a": "a"}
    assert b.resources.cpus == 0  # the type's default resources
    assert p.ancestors("b") == {"a"} and p.descendants("a") == {"b"}


def test_overrides_are_typed_and_nested(test_stages: None) -> None:
    p = parse_pipeline(GOOD, overrides=["b.dim=7", "b.inner.lr=1e-3", "a.text=B"])
    assert p.stages["b"].params.dim == 7
    assert p.stages["b"].params.inner.lr == pytest.approx(1e-3)
    assert p.stages["a"].params.text == "B"


def test_named_inputs_and_resources(test_stages: None) -> None:
    p = parse_pipeline("""
stages:
  a: {uses: test.write}
  b: {uses: test.write, inputs: {left: a}, resources: {cpus: 2, gpus: 0.5}}
""")
    assert p.stages["b"].inputs == {"left": "a"}
    assert p.stages["b"].resources.cpus == 2 and p.stages["b"].resources.gpus == 0.5


def test_resources_override_the_type_field_by_field(test_stages: None) -> None:
    from pipeline.registry import REGISTRY

    pretrain_default = REGISTRY.get("fusion.pretrain").resources
    assert pretrain_default.cpus == 0 and pretrain_default.pool == "train"
    p = parse_pipeline("""
pools: {train: 1}
stages:
  a: {uses: fusion.pretrain, with: {recipe: mlm}, resources: {gpus: 1}}
  b: {uses: test.write, resources: {pool: train}}
""")
    # Asking for a GPU keeps the type's cpus: 0 and pool, instead of resetting them to the defaults.
    assert p.stages["a"].resources.model_dump() == {"cpus": 0, "gpus": 1, "pool": "train"}
    assert p.stages["b"].resources.pool == "train" and p.pools == {"train": 1}


BAD = {
    "malformed_yaml": ("stages:\n  a:\n    uses: test.write\n    with: {text: [unclosed\n", [],
                       r"p.yaml:4: malformed YAML"),
    "unknown_stage_type": ("stages:\n  a:\n    uses: test.wirte\n", [],
                           r"p.yaml:3: stages.a.uses: unknown stage type 'test.wirte' (did you mean 'test.write'"),
    "unknown_input": ("stages:\n  a:\n    uses: test.write\n  b:\n    uses: test.write\n    inputs: [a, c]\n", [],
                      r"p.yaml:6: stages.b.inputs[1]: unknown input stage 'c'"),
    "cycle": ("stages:\n  a:\n    uses: test.write\n    inputs: [b]\n  b:\n    uses: test.write\n    inputs: [a]\n", [],
              r"cycle in stage inputs: "),
    "wrong_param_type": ("stages:\n  t:\n    uses: test.typed\n    with:\n      dim: three\n", [],
                         r"p.yaml:5: stages.t.with.dim: Input should be a valid integer"),
    "missing_required_param": ("stages:\n  t:\n    uses: test.typed\n    with:\n      name: x\n", [],
                               r"p.yaml:4: stages.t.with: missing required parameter 'dim'"),
    "unknown_param": ("stages:\n  t:\n    uses: test.typed\n    with:\n      dim: 1\n      dimm: 2\n", [],
                      r"p.yaml:6: stages.t.with.dimm: unknown parameter 'dimm'; known: dim, name, inner"),
    "unknown_set_key": ("stages:\n  t:\n    uses: test.typed\n    with: {dim: 1}\n", ["t.dimm=3"],
                        r"--set: t.dimm=3: unknown parameter 'dimm'"),
    "unknown_set_stage": ("stages:\n  t:\n    uses: test.typed\n    with: {dim: 1}\n", ["u.dim=3"],
                          r"--set: u.dim=3: unknown stage 'u'"),
    "wrong_set_type": ("stages:\n  t:\n    uses: test.typed\n    with: {dim: 1}\n", ["t.dim=abc"],
                       r"--set: t.dim=abc: Input should be a valid integer"),
    "unknown_top_level_field": ("stages:\n  t: {uses: test.write}\nstagez: {}\n", [],
                                r"p.yaml:3: stagez: unknown field 'stagez'"),
    "pool_size_zero": ("pools: {slow: 0}\nstages:\n  a: {uses: test.write, resources: {pool: slow}}\n",
                       [], r"p.yaml:1: pools.slow: Input should be greater than 0"),
    "pool_nobody_uses": ("pools: {slwo: 1}\nstages:\n  a: {uses: test.write, resources: {pool: slow}}\n",
                         [], r"p.yaml:1: pools.slwo: no stage is in pool 'slwo'; pools the stages use: slow"),
    "not_a_mapping": ("- just\n- a list\n", [], r"p.yaml:1: a pipeline is a mapping"),
    # Hostile or mistaken YAML: one line too, never a traceback or gigabytes of memory.
    "duplicate_stage": ("stages:\n  a: {uses: test.write}\n  b: {uses: test.write}\n"
                        "  a: {uses: test.typed}\n", [],
                        r"p.yaml:4: stages.a: duplicate key 'a' (first at line 2)"),
    "duplicate_param": ("stages:\n  t:\n    uses: test.typed\n    with:\n      dim: 1\n"
                        "      name: x\n      dim: 2\n", [],
                        r"p.yaml:7: stages.t.with.dim: duplicate key 'dim' (first at line 5)"),
    "recursive_alias": ("stages:\n  a: &s\n    uses: test.write\n    with: {text: [*s]}\n", [],
                        r"p.yaml:4: stages.a.with.text[0]: recursive alias *s"),
    "deep_nesting": ("stages:\n  a: {uses: test.write, with: {text: " + "[" * 5000 + "]" * 5000
                     + "}}\n", [], r"nested deeper than 100 levels"),
    "billion_laughs": (None, [], r"YAML aliases expand to more than"),
}


def billion_laughs() -> str:
    """Nine levels, each a list of 9 aliases of the one before: 9**9 strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "stages:\n  x: {uses: test.write}\n" + "\n".join(lines) + "\n"


BAD["billion_laughs"] = (billion_laughs(), *BAD["billion_laughs"][1:])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line_exit_2_nothing_runs(case: str, tmp_path: Path, test_stages: None,
                                                          capsys: pytest.CaptureFixture) -> None:
    text, sets, expected = BAD[case]
    path = write(tmp_path, text)
    store = tmp_path / "store"
    argv = ["run", str(path), "--store", str(store)]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert expected.replace("p.yaml", str(path)) in lines[0] or expected in lines[0], lines[0]
    assert not store.exists()  # validated before anything ran, not even the store was touched


def test_cycle_names_the_stages(test_stages: None) -> None:
    with pytest.raises(SpecError) as e:
        parse_pipeline(BAD["cycle"][0], file="c.yaml")
    msg = str(e.value)
    assert msg.startswith("c.yaml:") and "a" in msg and "b" in msg and "->" in msg


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read pipeline"):
        load_pipeline(tmp_path / "nope.yaml")


def test_bad_set_syntax(test_stages: None) -> None:
    with pytest.raises(SpecError, match="expected STAGE.PARAM=VALUE"):
        parse_pipeline(GOOD, overrides=["nodot=3"])


def test_store_relative_to_pipeline_file(tmp_path: Path, test_stages: None) -> None:
    p = write(tmp_path, "store: ./here\nstages:\n  a: {uses: test.write}\n")
    assert load_pipeline(p).store == str(tmp_path / "here")


def test_path_tag_is_relative_to_the_pipeline_file(tmp_path: Path, test_stages: None) -> None:
    sub = tmp_path / "pipes"
    sub.mkdir()
    p = sub / "p.yaml"
    p.write_text("stages:\n  a: {uses: test.write, with: {text: !path ../data/x.txt}}\n")
    assert load_pipeline(p).stages["a"].params.text == str(tmp_path / "data" / "x.txt")


def test_unsafe_yaml_tags_are_refused(tmp_path: Path, test_stages: None) -> None:
    with pytest.raises(SpecError, match="malformed YAML"):
        parse_pipeline("stages:\n  a: !!python/object/apply:os.system ['true']\n")


def test_data_tag_resolves_under_stele_data_or_says_it_is_unset(tmp_path, monkeypatch):
    text = "name: t\nstages:\n  a:\n    uses: core.snapshot\n    with: {path: !data emoji/x}\n"
    monkeypatch.setenv("STELE_DATA", str(tmp_path))
    p = parse_pipeline(text, file="t.yaml")
    assert p.stages["a"].params.path == str((tmp_path / "emoji" / "x").resolve())
    monkeypatch.delenv("STELE_DATA")
    with pytest.raises(SpecError, match=r"t.yaml:5: !data emoji/x: STELE_DATA is not set"):
        parse_pipeline(text, file="t.yaml")


# ---------------------------------------------------------------------------------- input roles
def _role_registry():
    """Stage types with declared input roles (and one without), in a registry of their own."""
    from pipeline.registry import Input, Registry, stage

    reg = Registry(_loaded=True)
    stage("t.source", registry=reg, inputs={})(lambda ctx: None)
    stage("t.other", registry=reg, inputs={})(lambda ctx: None)
    stage("t.legacy", registry=reg)(lambda ctx: None)  # roles not declared: not checked
    stage("t.sink", registry=reg, inputs={
        "graph": Input("t.source", "what it reads"),
        "extra": Input(("t.source", "t.other"), "either", required=False),
        "anything": Input((), "any type", required=False)})(lambda ctx: None)
    return reg


ROLES_OK = """\
stages:
  src: {uses: t.source}
  oth: {uses: t.other}
  leg: {uses: t.legacy, inputs: {whatever: src, more: oth}}
  a: {uses: t.sink, inputs: {graph: src}}
  b: {uses: t.sink, inputs: {graph: src, extra: oth, anything: leg}}
  graph: {uses: t.source}
  c: {uses: t.sink, inputs: [graph]}
"""


def test_declared_input_roles_accept_their_types() -> None:
    p = parse_pipeline(ROLES_OK, file="r.yaml", registry=_role_registry())
    assert p.stages["b"].inputs == {"graph": "src", "extra": "oth", "anything": "leg"}
    assert p.stages["c"].inputs == {"graph": "graph"}  # a list entry is its own role
    assert p.stages["leg"].inputs == {"whatever": "src", "more": "oth"}  # undeclared: unchecked


ROLES_BAD = {
    "unknown_role": ("  a: {uses: t.sink, inputs: {grph: src}}\n",
                     "r.yaml:4: stages.a.inputs.grph: unknown input role 'grph' of t.sink (did you "
                     "mean 'graph'?); roles of t.sink: graph (t.source), extra (t.source | t.other, "
                     "optional), anything (any, optional)"),
    "unknown_role_by_type": ("  a: {uses: t.sink, inputs: {kg: src}}\n",
                             "r.yaml:4: stages.a.inputs.kg: unknown input role 'kg' of t.sink (did "
                             "you mean 'graph'?)"),
    "list_entry_is_its_role": ("  a: {uses: t.sink, inputs: [src]}\n",
                               "r.yaml:4: stages.a.inputs[0]: unknown input role 'src' of t.sink (in "
                               "a list, the stage's name is its role); name the role: "
                               "inputs: {graph: src}"),
    "missing_required": ("  a:\n    uses: t.sink\n    inputs: {extra: oth}\n",
                         "r.yaml:6: stages.a.inputs: missing required input role 'graph' of t.sink "
                         "(takes t.source): what it reads"),
    "missing_required_no_inputs": ("  a: {uses: t.sink}\n",
                                   "r.yaml:4: stages.a.inputs: missing required input role 'graph'"),
    "wrong_type": ("  a: {uses: t.sink, inputs: {graph: oth}}\n",
                   "r.yaml:4: stages.a.inputs.graph: input role 'graph' of t.sink takes t.source; "
                   "stage 'oth' is t.other"),
    "takes_no_inputs": ("  a: {uses: t.source, inputs: {graph: src}}\n",
                        "r.yaml:4: stages.a.inputs.graph: unknown input role 'graph' of t.source; "
                        "t.source takes no inputs"),
}


@pytest.mark.parametrize("case", sorted(ROLES_BAD))
def test_input_role_mistakes_name_file_line_and_field(case: str) -> None:
    extra, expected = ROLES_BAD[case]
    text = "stages:\n  src: {uses: t.source}\n  oth: {uses: t.other}\n" + extra
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="r.yaml", registry=_role_registry())
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)  # one mistake, one line


def test_every_input_role_mistake_is_reported_at_once() -> None:
    text = ("stages:\n  src: {uses: t.source}\n  oth: {uses: t.other}\n"
            "  a: {uses: t.sink, inputs: {graph: oth}}\n"
            "  b: {uses: t.sink, inputs: {grph: src}}\n"
            "  c: {uses: t.sink}\n")
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="r.yaml", registry=_role_registry())
    lines = str(e.value).splitlines()
    assert [ln.split(": ")[0] for ln in lines] == ["r.yaml:4", "r.yaml:5", "r.yaml:6"], lines
    assert "stages.a.inputs.graph" in lines[0] and "stages.b.inputs.grph" in lines[1]
    assert "stages.c.inputs: missing required input role 'graph'" in lines[2]
    # the misspelt role of b is not reported a second time as a missing 'graph'
    assert (e.value.file, e.value.line, e.value.field) == ("r.yaml", 4, "stages.a.inputs.graph")


def test_shipped_pipelines_satisfy_their_input_roles(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STELE_DATA", str(tmp_path))
    pipelines = sorted((Path(__file__).parents[2] / "pipelines").glob("*.yaml"))
    assert pipelines
    for p in pipelines:
        load_pipeline(p)  # raises on any role mistake


# ------------------------------------------------------------------------------ hostile YAML
def test_duplicate_keys_anywhere_are_an_error_naming_both_lines(test_stages: None) -> None:
    text = "name: x\nstages:\n  a: {uses: test.write}\nname: y\n"
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="d.yaml")
    assert str(e.value) == "d.yaml:4: name: duplicate key 'name' (first at line 1); YAML would " \
                           "keep only the last", str(e.value)
    # In a flow mapping both are on one line; keys equal as values (1 and 0x1) are duplicates too.
    with pytest.raises(SpecError, match=r"d.yaml:2: stages.a.with.text: duplicate key 'text' "
                                        r"\(first at line 2\)"):
        parse_pipeline("stages:\n  a: {uses: test.write, with: {text: A, text: B}}\n",
                       file="d.yaml")
    with pytest.raises(SpecError, match=r"d.yaml:5: pools.0x1: duplicate key '0x1' \(the same key "
                                        r"as '1' at line 4\)"):
        parse_pipeline("stages:\n  a: {uses: test.write}\npools:\n  1: 1\n  0x1: 2\n",
                       file="d.yaml")


def test_merge_keys_may_still_override_what_they_merge(test_stages: None) -> None:
    p = parse_pipeline("stages:\n"
                       "  a: {uses: test.write, with: &w {text: A, parts: 2}}\n"
                       "  b: {uses: test.write, with: {<<: *w, text: B}}\n")
    assert (p.stages["b"].params.text, p.stages["b"].params.parts) == ("B", 2)


@pytest.mark.parametrize("text, expected", [
    ("x: &x [*x]\nstages:\n  a: {uses: test.write}\n", "h.yaml:1: x[0]: recursive alias *x"),
    ("stages: &s\n  a: {uses: test.write, with: {text: *s}}\n",
     "h.yaml:2: stages.a.with.text: recursive alias *s"),
    ("stages:\n  a: {uses: test.write, with: {text: " + "{k: " * 5000 + "1" + "}" * 5000 + "}}\n",
     "h.yaml:2: stages.a.with.text.k.k.k.k.k.k...: nested deeper than 100 levels"),
    ("stages:\n  a:\n    uses: test.write\n    with:\n      text:\n"  # block style, 500 deep
     + "".join("  " * i + "        -\n" for i in range(500)),
     "h.yaml:102: stages.a.with.text[0][0][0][0][0][0]...: nested deeper than 100 levels"),
    # an alias that is shallow where it is defined but deep where it is used
    ("stages:\n  a: {uses: test.write, with: {text: &d " + "[" * 60 + "]" * 60 + "}}\n"
     "  b: {uses: test.write, with: {text: " + "[" * 60 + "*d" + "]" * 60 + "}}\n",
     "h.yaml:3: stages.b.with.text[0][0][0][0][0][0]...: nested deeper than 100 levels "
     "(through alias *d)"),
], ids=["recursive_seq", "recursive_map", "deep_flow_map", "deep_block_seq", "deep_through_alias"])
def test_recursive_aliases_and_deep_nesting_are_one_line_errors(text: str, expected: str,
                                                                 test_stages: None) -> None:
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="h.yaml")
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_billion_laughs_fails_fast_in_little_memory(test_stages: None) -> None:
    import tracemalloc

    text = billion_laughs()
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as e:
            parse_pipeline(text, file="l.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "YAML aliases expand to more than 100000 nodes" in str(e.value), str(e.value)
    assert str(e.value).startswith("l.yaml:") and e.value.line is not None
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB"  # the walk would need gigabytes


def test_a_large_pipeline_within_the_limits_still_loads(test_stages: None) -> None:
    # Aliases are fine while they stay small: 10 stages sharing one 1,000-item parameter list.
    items = ", ".join(["x"] * 1000)
    text = "stages:\n  s0: {uses: test.write, with: {text: &t [" + items + "]}}\n"
    text += "".join(f"  s{i}: {{uses: test.write, with: {{text: *t}}}}\n" for i in range(1, 10))
    with pytest.raises(SpecError, match=r"stages.s\d.with.text: Input should be a valid string"):
        parse_pipeline(text, file="big.yaml")  # validated as usual: not refused by the limits


def test_set_values_get_the_same_yaml_limits(test_stages: None) -> None:
    with pytest.raises(SpecError) as e:
        parse_pipeline(GOOD, overrides=["a.text=&x [*x]"])
    assert str(e.value).startswith(
        "--set: a.text=&x [*x]: value is not valid YAML: recursive alias *x"), str(e.value)


# ------------------------------------------------------------------- every mistake of a file at once
THREE_MISTAKES = """\
stages:
  a:
    uses: test.wirte
  b:
    uses: test.typed
    with: {dim: three}
  c:
    uses: test.write
    inputs: [a, nope]
"""


def test_every_mistake_of_a_file_is_its_own_line_exit_2(tmp_path: Path, test_stages: None,
                                                         capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, THREE_MISTAKES)
    store = tmp_path / "store"
    assert main(["run", str(path), "--store", str(store), "--set", "zz.x=1"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "error: --set: zz.x=1: unknown stage 'zz'; stages: a, b, c",
        f"error: {path}:3: stages.a.uses: unknown stage type 'test.wirte' (did you mean "
        f"'test.write', 'test.typed'?)",
        f"error: {path}:6: stages.b.with.dim: Input should be a valid integer, unable to parse "
        f"string as an integer (got 'three')",
        f"error: {path}:9: stages.c.inputs[1]: unknown input stage 'nope'; stages: a, b, c",
    ], lines
    assert not store.exists()


def test_mistakes_within_one_stage_and_in_its_fields_are_all_reported(test_stages: None) -> None:
    text = ("stages:\n"
            "  a:\n    use: test.write\n"                                  # no uses, unknown use
            "  b:\n    uses: test.typed\n    with: {dim: x, inner: {lr: y}, nope: 1}\n"
            "  b.c: {uses: test.write}\n")
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="m.yaml")
    assert str(e.value).splitlines() == [
        "m.yaml:2: stages.a: missing required field 'uses'",
        "m.yaml:3: stages.a.use: unknown field 'use'; known: uses, with, inputs, resources",
        "m.yaml:6: stages.b.with.dim: Input should be a valid integer, unable to parse string as an "
        "integer (got 'x')",
        "m.yaml:6: stages.b.with.inner.lr: Input should be a valid number, unable to parse string as "
        "a number (got 'y')",
        "m.yaml:6: stages.b.with.nope: unknown parameter 'nope'; known: dim, name, inner",
        "m.yaml:7: stages.b.c: stage name 'b.c' must match ^[A-Za-z_][A-Za-z0-9_-]*$ (no dots)",
    ], str(e.value)
    assert (e.value.file, e.value.line, e.value.field) == ("m.yaml", 2, "stages.a")


class UnionParams(BaseModel):
    size: int | str = 1
    n: int | None = None


def _union_stage(ctx: object, params: UnionParams) -> None:
    """A stage type whose parameters are unions."""


def test_a_mistake_is_reported_once_not_again_as_its_consequences(test_stages: None) -> None:
    from pipeline.registry import Input, Registry, stage

    reg = Registry(_loaded=True)
    stage("t.src", registry=reg, inputs={})(lambda ctx: None)
    stage("t.sink", registry=reg, inputs={"src": Input("t.src")})(lambda ctx: None)
    stage("t.u", registry=reg)(_union_stage)
    text = ("stages:\n  s: {uses: t.srcc}\n"              # unknown type: its dependants' roles
            "  k: {uses: t.sink, inputs: {src: s}}\n"     # are not checked against a guess,
            "  k2: {uses: t.sink, inputs: {src: gone}}\n"  # nor is a missing role reported
            "  u: {uses: t.u, with: {size: [1], n: x}}\n")  # one line per field of a union
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="c.yaml", registry=reg)
    lines = str(e.value).splitlines()
    assert [ln.split(": ")[:2] for ln in lines] == [
        ["c.yaml:2", "stages.s.uses"], ["c.yaml:4", "stages.k2.inputs.src"],
        ["c.yaml:5", "stages.u.with.size"], ["c.yaml:5", "stages.u.with.n"]], lines


def test_at_most_twenty_mistakes_are_listed(test_stages: None) -> None:
    text = "stages:\n" + "".join(f"  s{i}: {{uses: test.nope}}\n" for i in range(25))
    with pytest.raises(SpecError) as e:
        parse_pipeline(text, file="many.yaml")
    lines = str(e.value).splitlines()
    assert len(lines) == 21 and all("unknown stage type 'test.nope'" in ln for ln in lines[:20])
    assert lines[:2] == [ln.replace("s0", f"s{i}").replace(":2:", f":{i + 2}:")
                         for i, ln in enumerate([lines[0]] * 2)]
    assert lines[20] == "many.yaml: 5 more mistakes not shown; fix these first"


def test_set_from_python_takes_values_as_they_are(tmp_path: Path, test_stages: None) -> None:
    p = parse_pipeline(GOOD, overrides={"b.dim": 7, "b.inner.lr": 0.25, "a.text": "3"})
    assert (p.stages["b"].params.dim, p.stages["b"].params.inner.lr) == (7, 0.25)
    assert p.stages["a"].params.text == "3"  # a string: as a `--set` value it would read as 3
    with pytest.raises(SpecError, match=r"^--set: a.text=3: Input should be a valid string"):
        parse_pipeline(GOOD, overrides={"a.text": 3})
    assert load_pipeline(write(tmp_path, GOOD), {"a.text": tmp_path}).stages["a"].params.text \
        == str(tmp_path)  # a path is given as its text
