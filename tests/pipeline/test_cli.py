"""The `stele` console script as a user types it: run, plan, show, stages, errors, exit codes, and
the subcommands packages contribute (``stele.commands``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ..conftest import make_plugin_site, stele

PIPE = """\
name: cli
stages:
  a: {uses: test.write, with: {text: A}}
  b: {uses: test.write, inputs: [a], with: {text: B}}
  c: {uses: test.write, inputs: [a], with: {text: C, fail: true}}
"""


@pytest.mark.slow
def test_run_plan_show_roundtrip(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(PIPE)
    store = tmp_path / "store"

    plan = stele("plan", str(p), "--store", str(store), env=plugin_env, check=True).stdout
    assert plan.count(" run ") == 3 and "not in store" in plan
    assert not (store / "artifacts").exists()  # plan runs nothing

    run = stele("run", str(p), "--store", str(store), "--no-live", env=plugin_env)
    assert run.returncode == 1  # a stage failed
    assert "cli: 2 ran, 1 failed" in run.stdout
    assert "✖ c [test.write] ValueError: asked to fail (text='C')" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr  # the stage's error, not a wrapper dump

    plan = stele("plan", str(p), "--store", str(store), env=plugin_env, check=True).stdout
    assert plan.count("cached") == 2 and plan.count(" run ") == 1

    # STELE_STORE selects the store too; show prints the manifest by key prefix.
    env = dict(plugin_env, STELE_STORE=str(store))
    keys = sorted((store / "artifacts").iterdir())
    shown = stele("show", keys[0].name[:10], "--verify", env=env, check=True).stdout
    manifest = json.loads(shown[: shown.rindex("}") + 1])
    assert manifest["key"] == keys[0].name and "verified" in shown
    assert stele("show", "zzzzzzzz", env=env).returncode == 2

    stages = stele("stages", env=plugin_env, check=True).stdout
    assert "test.write" in stages and "core.snapshot" in stages and "sleep" in stages

    bad = stele("run", str(p), "--store", str(store), "--set", "a.nope=1", env=plugin_env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--set: a.nope=1: unknown parameter 'nope'" in bad.stderr
    bad = stele("run", str(p), "--store", str(store), "--force", "zz", env=plugin_env)
    assert bad.returncode == 2 and "unknown stage 'zz'" in bad.stderr


@pytest.mark.slow
def test_a_damaged_artifact_is_shown_by_show_verify_and_made_again_by_run_verify(
        tmp_path: Path, plugin_env: dict[str, str]) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(PIPE.replace(", fail: true", ""))
    store = tmp_path / "store"
    args = ("--store", str(store), "--no-live")
    stele("run", str(p), *args, env=plugin_env, check=True)
    record = sorted((store / "runs").glob("*.json"))
    keys = {json.loads(f.read_text())["stages"][n]["key"] for f in record for n in "abc"}
    by_stage = {json.loads((store / "artifacts" / k / "manifest.json").read_text())["stage"]: k
                for k in keys}
    b = store / "artifacts" / by_stage["b"]
    (b / "part1.txt").write_text("B" * 7)  # truncated after its commit
    (b / "part2.txt").unlink()             # and a file lost

    shown = stele("show", by_stage["b"][:10], "--store", str(store), "--verify", env=plugin_env)
    assert shown.returncode == 1
    assert "damaged: part1.txt: 7 bytes, manifest says 100" in shown.stdout
    assert "damaged: part2.txt: missing" in shown.stdout
    # A plain run trusts the store; --verify checks it and makes b again (not a or c).
    plan = stele("plan", str(p), *args[:2], "--verify", env=plugin_env, check=True).stdout
    assert "damaged: part1.txt" in plan and plan.count("cached") == 2
    again = stele("run", str(p), *args, "--verify", env=plugin_env, check=True)
    last = max((store / "runs").glob("*.json"), key=lambda f: f.stat().st_mtime)
    statuses = {n: s["status"] for n, s in json.loads(last.read_text())["stages"].items()}
    assert statuses == {"a": "cached", "b": "ran", "c": "cached"}, again.stdout
    assert (b / "part2.txt").read_text() == "B" * 100
    verified = stele("show", by_stage["b"][:10], "--store", str(store), "--verify", env=plugin_env)
    assert verified.returncode == 0 and "verified" in verified.stdout


def test_a_missing_input_file_is_one_line_before_ray_starts(tmp_path: Path,
                                                            plugin_env: dict[str, str]) -> None:
    p = tmp_path / "p.yaml"
    missing = tmp_path / "nope" / "kg.tsv"
    p.write_text(f"name: m\nstages:\n  kg:\n    uses: knowledge.ingest\n"
                 f"    with: {{sources: [{{type: triples, path: {missing}}}]}}\n")
    for cmd in ("run", "plan"):
        out = stele(cmd, str(p), "--store", str(tmp_path / "s"), env=plugin_env)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.strip() == f"error: {p}:5: stages.kg.with: input {missing} does not exist"
        assert "ray:" not in out.stdout  # Ray never started
    assert not (tmp_path / "s" / "runs").exists()


def test_snapshot_stage_tracks_file_content(tmp_path: Path, plugin_env: dict[str, str],
                                            ray_local: None) -> None:
    """core.snapshot: edited data re-runs the stage although no parameter changed."""
    from pipeline.errors import SpecError
    from pipeline.runner import run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "x.txt").write_text("one")
    (data / "sub" / "y.csv").write_text("a,b\n")
    spec = f"stages:\n  snap: {{uses: core.snapshot, with: {{path: {data}}}}}\n"
    store = ArtifactStore(tmp_path / "store")
    r1 = run(parse_pipeline(spec), store, live=False)
    art = store.open(r1.outcomes["snap"].key)
    assert (art / "files" / "sub" / "y.csv").read_text() == "a,b\n"
    checks = json.loads((art / "checksums.json").read_text())
    assert set(checks) == {"x.txt", "sub/y.csv"} and art.metrics == {"files": 2, "bytes": 7}
    assert run(parse_pipeline(spec), store, live=False).outcomes["snap"].status == "cached"
    (data / "x.txt").write_text("two!")
    r3 = run(parse_pipeline(spec), store, live=False)
    assert r3.outcomes["snap"].status == "ran" and r3.outcomes["snap"].key != r1.outcomes["snap"].key
    missing = f"stages:\n  snap: {{uses: core.snapshot, with: {{path: {tmp_path / 'nope'}}}}}\n"
    with pytest.raises(SpecError, match=r"<string>:2: stages.snap.with: .*nope does not exist"):
        run(parse_pipeline(missing), store, live=False)  # found while planning: nothing runs


KG_STAGES = """\
stages:
  kg:
    uses: knowledge.ingest
    with: {sources: [{type: pykeen, dataset: nations}]}
  emb:
    uses: knowledge.embed
"""
ROLE_MISTAKES = {
    "unknown_role": ("    inputs: {graph: kg}\n",
                     ":7: stages.emb.inputs.graph: unknown input role 'graph' of knowledge.embed "
                     "(did you mean 'kg'?)"),
    "missing_required_role": ("    with: {dim: 8}\n",
                              ":5: stages.emb.inputs: missing required input role 'kg' of "
                              "knowledge.embed (takes knowledge.ingest)"),
    "wrong_upstream_type": ("    inputs: {kg: kg}\n  ev:\n    uses: knowledge.evaluate\n"
                            "    inputs: {kg: kg, model: kg}\n",
                            ":10: stages.ev.inputs.model: input role 'model' of knowledge.evaluate "
                            "takes knowledge.embed; stage 'kg' is knowledge.ingest"),
}


@pytest.mark.parametrize("case", sorted(ROLE_MISTAKES))
def test_plan_checks_input_roles_before_anything_starts(case: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    extra, expected = ROLE_MISTAKES[case]
    p = tmp_path / "p.yaml"
    p.write_text(KG_STAGES + extra)
    store = tmp_path / "store"
    code = main(["plan", str(p), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"error: {p}{expected}" in lines[0], err
    assert main(["run", str(p), "--store", str(store)]) == 2  # the same, before Ray starts
    assert f"error: {p}{expected}" in capsys.readouterr().err
    assert not store.exists()


def test_stages_lists_input_roles(capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    assert main(["stages", "knowledge.evaluate"]) == 0
    out = capsys.readouterr().out
    assert "input role" in out and "takes" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()
            if ln.strip().startswith(("kg ", "model "))}
    assert rows["kg"][1:3] == ["knowledge.ingest", "required"], out
    assert rows["model"][1:3] == ["knowledge.embed", "required"], out
    assert main(["stages", "knowledge.embed"]) == 0
    out = capsys.readouterr().out
    assert any(ln.split()[:3] == ["kg", "knowledge.ingest", "required"]
               for ln in out.splitlines()), out
    assert main(["stages", "fusion.retrieval"]) == 0
    out = capsys.readouterr().out
    assert any(ln.split()[:5] == ["first_stage", "fusion.pretrain", "optional", "an", "encoder"]
               for ln in out.splitlines()), out
    assert main(["stages", "knowledge.ingest"]) == 0
    assert "input roles: none" in capsys.readouterr().out


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines by terminal width


def test_a_registered_command_is_a_subcommand(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main
    from pipeline.commands import COMMANDS, command

    COMMANDS.load_plugins()
    monkeypatch.setattr(COMMANDS, "types", dict(COMMANDS.types))

    @command("hello", help="say hello (a test command)")
    class Hello:
        def add_arguments(self, parser) -> None:
            parser.add_argument("--name", default="world")
            parser.add_argument("--fail", action="store_true")

        def run(self, args, console) -> int:
            console.print(f"hello {args.name}")
            return 3 if args.fail else 0

    @command("report", help="a plugin may not take a built-in's name")
    class Report:
        def add_arguments(self, parser) -> None:
            pass

        def run(self, args, console) -> int:
            raise AssertionError("the built-in report command must run")

    assert isinstance(COMMANDS.types["hello"], Hello) and COMMANDS.types["hello"].name == "hello"
    shown = _help(main, capsys)
    assert "hello say hello (a test command)" in shown and "eval evaluate artifacts" in shown
    assert "a plugin may not take" not in shown
    assert main(["hello", "--name", "stele"]) == 0
    assert capsys.readouterr().out == "hello stele\n"
    assert main(["hello", "--fail"]) == 3
    with pytest.raises(SystemExit) as e:
        main(["hello", "--nope"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["report", "--store", str(tmp_path / "empty")]) == 2  # the built-in: no runs
    assert "no runs recorded" in capsys.readouterr().err


def test_a_command_plugin_that_fails_to_import_does_not_break_stele(tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    from pipeline.cli import main
    from pipeline.commands import COMMANDS

    (tmp_path / "broken_cmd.py").write_text("raise ImportError('missing dependency')\n")
    site = make_plugin_site(tmp_path, tmp_path / "broken_cmd.py", name="broken_cmd",
                            group="stele.commands")
    monkeypatch.syspath_prepend(str(site))
    COMMANDS.load_plugins()
    monkeypatch.setattr(COMMANDS, "plugin_errors", {})
    monkeypatch.setattr(COMMANDS, "_loaded", False)

    shown = _help(main, capsys)
    assert "command plugins that failed to load: broken_cmd = broken_cmd (ImportError: missing " \
           "dependency)" in shown
    assert "eval evaluate artifacts" in shown  # the other packages' commands are still there
    assert main(["report", "--store", str(tmp_path / "empty")]) == 2
    assert "no runs recorded" in capsys.readouterr().err


# ------------------------------------------------------------------------ store, console text
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test, instead of starting Ray in the test process, if a command got that far."""
    def started(*args, **kwargs):
        raise AssertionError("Ray started / the run began")

    monkeypatch.setattr("pipeline.ray_utils.init_ray", started)
    monkeypatch.setattr("pipeline.runner.run", started)


@pytest.mark.parametrize("case", ["a_file", "under_a_file", "under_proc", "unknown_protocol"])
def test_a_store_that_cannot_be_used_is_one_line_before_ray_starts(
        case: str, tmp_path: Path, test_stages: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    _no_ray(monkeypatch)
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  a: {uses: test.write}\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    store, why = {"a_file": (str(afile), "exists and is not a directory"),
                  "under_a_file": (str(afile / "store"), "cannot create it"),
                  "under_proc": ("/proc/stele-no-such/store", "cannot create it"),
                  "unknown_protocol": ("nosuchproto://bucket/stele",
                                       "Protocol not known: nosuchproto")}[case]
    for cmd in (["run", str(p)], ["plan", str(p)], ["demo"]):
        code = main([*cmd, "--store", store])
        err = capsys.readouterr().err
        assert code == 2, (cmd, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: store {store}: {why}"), (cmd, err)
    assert afile.read_text() == "x"


def test_s3_store_without_s3fs_says_what_to_install(tmp_path: Path, test_stages: None,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture,
                                                    no_s3fs: None) -> None:
    from pipeline.cli import main

    _no_ray(monkeypatch)
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  a: {uses: test.write}\n")
    assert main(["run", str(p), "--store", "s3://bucket/stele"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s3://bucket/stele" in err and "pip install 'stele[s3]'" in err, err


def test_a_creatable_store_passes_and_plan_creates_nothing(tmp_path: Path, test_stages: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    _no_ray(monkeypatch)
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  a: {uses: test.write}\n")
    assert main(["plan", str(p), "--store", str(tmp_path / "new" / "store")]) == 0
    assert "not in store" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()


def test_error_text_is_printed_verbatim_not_as_emoji(tmp_path: Path, test_stages: None,
                                                     capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    p = tmp_path / "p.yaml"
    p.write_text('stages:\n  a: {uses: "bad:x:type"}\n')
    assert main(["plan", str(p), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "unknown stage type 'bad:x:type'" in err and "\u274c" not in err, err


# ------------------------------------------------------------------ names: show STAGE, ls, help
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> tuple[Path, list]:
    """A store with two runs of PIPE (a's text changed in between: new keys for a and b; c fails
    both times): (store, [first result, second result])."""
    from pipeline.runner import run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    store = tmp_path_factory.mktemp("names") / "store"
    results = []
    for text in ("A1", "A2"):
        if results:  # run ids name the second they start in: make the second run's the later
            while time.strftime("%Y%m%d-%H%M%S") <= results[0].run_id[:15]:
                time.sleep(0.05)
        results.append(run(parse_pipeline(PIPE, overrides=[f"a.text={text}"]), ArtifactStore(store),
                           live=False))
    return store, results


def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_show_takes_a_stage_name_from_the_latest_run_or_the_one_named(
        two_runs: tuple[Path, list], capsys: pytest.CaptureFixture) -> None:
    store, (first, second) = two_runs
    code, out, err = _main(capsys, "show", "b", "--store", str(store))
    assert code == 0, err
    assert json.loads(out)["key"] == second.outcomes["b"].key != first.outcomes["b"].key
    assert f"b: ran in run {second.run_id}, artifact {second.outcomes['b'].key}" in err
    code, out, err = _main(capsys, "show", "b", "--run", first.run_id[:-1], "--store", str(store))
    assert code == 0 and json.loads(out)["key"] == first.outcomes["b"].key, err
    # keys, prefixes and folders keep working
    key = first.outcomes["a"].key
    for ref in (key, key[:8], str(store / "artifacts" / key)):
        code, out, err = _main(capsys, "show", ref, "--store", str(store))
        assert code == 0 and json.loads(out)["key"] == key, (ref, err)


@pytest.mark.parametrize("argv, expected", [
    (("show", "c"), "error: stage 'c' has no artifact: no run made or reused it (the latest run "
                    "with it, {second}: failed)"),
    (("show", "c", "--run", "latest"), "error: stage 'c' failed in run {second}: it has no artifact"),
    (("show", "bb"), "error: no stage 'bb' in the runs of {store} (did you mean 'b'?)"),
    (("show", "zzz"), "error: no stage 'zzz' in the runs of {store}; stages: a, b, c"),
    (("show", "b", "--run", "1999"), "error: no run '1999' in {store} (latest: {second})"),
    (("ls", "1999"), "error: no run '1999' in {store} (latest: {second})"),
], ids=["failed_everywhere", "failed_in_that_run", "did_you_mean", "unknown", "no_such_run",
        "ls_no_such_run"])
def test_a_stage_name_without_an_artifact_is_one_line_exit_2(
        argv: tuple[str, ...], expected: str, two_runs: tuple[Path, list],
        capsys: pytest.CaptureFixture) -> None:
    store, (_, second) = two_runs
    code, out, err = _main(capsys, *argv, "--store", str(store))
    assert code == 2 and not out, out
    assert err.strip() == expected.format(store=store, second=second.run_id), err


def test_ls_lists_runs_newest_first_and_a_runs_stages(two_runs: tuple[Path, list],
                                                      capsys: pytest.CaptureFixture) -> None:
    store, (first, second) = two_runs
    code, out, _ = _main(capsys, "ls", "--store", str(store))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["run", "pipeline", "started", "wall", "stages"]
    assert [ln.split()[:2] for ln in lines[1:]] == [[second.run_id, "cli"], [first.run_id, "cli"]]
    assert all(ln.endswith("2 ran, 1 failed") for ln in lines[1:]), out
    code, out, _ = _main(capsys, "ls", first.run_id[:-1], "--store", str(store))
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"run {first.run_id}  cli  (store {store}, ")
    assert lines[1].split() == ["stage", "type", "status", "wall", "key"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    for n, o in first.outcomes.items():  # the whole key, to copy or to find the folder by
        assert rows[n][:3] == [n, "test.write", o.status] and rows[n][-1] == o.key, out
        assert " ".join(rows[n][3:-1]).endswith(" s"), out  # a wall time, in seconds
    code, out, _ = _main(capsys, "ls", "--store", str(store.parent / "empty"))
    assert code == 0 and out.strip() == f"no runs recorded in {store.parent / 'empty'}"


def test_the_run_summary_gives_the_total_wall_time(tmp_path: Path, test_stages: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from pipeline.runner import RunResult, print_summary
    from pipeline.runs import start_run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    def text(result: RunResult) -> str:
        console = Console(record=True, width=200)
        print_summary(result, console)
        return console.export_text()

    result = RunResult("20260101-000000-abcdef", "p", "/s", {}, wall_s=75.4)
    assert text(result).startswith("p: nothing to do in 1 m 15 s (store /s, run 20260101-"), text(result)
    result.wall_s = None  # (a RunResult made by pipeline.runner.run itself)
    assert text(result).startswith("p: nothing to do (store /s")
    # start_run, what `stele run` calls, sets it
    monkeypatch.setattr("pipeline.ray_utils.init_ray", lambda *a, **k: {})
    monkeypatch.setattr("pipeline.runner.run", lambda *a, **k: RunResult("r", "p", "/s", {}))
    done = start_run(parse_pipeline("stages:\n  a: {uses: test.write}\n"), ArtifactStore(tmp_path))
    assert done.wall_s is not None and done.wall_s >= 0


def test_version(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"stele {version('stele')}\n"


def _cmd_help(main, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_every_help_shows_the_defaults(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main
    from pipeline.commands import COMMANDS, command

    shown = _cmd_help(main, capsys, "eval", "retrieval")  # a package's command, two levels down
    for option, default in (("--mode", "rerank"), ("--k", "32"), ("--split", "test"),
                            ("--batch-size", "256"), ("--workers", "1"), ("--gpus-per-worker", "0"),
                            ("--examples", "6"), ("--limit", "all")):
        assert f"(default: {default})" in shown.split(f" {option} ", 1)[1].split(" --", 1)[0], option
    assert "(default: latest)" in _cmd_help(main, capsys, "report")
    assert "(default: None)" not in shown and "(default: False)" not in shown

    COMMANDS.load_plugins()
    monkeypatch.setattr(COMMANDS, "types", dict(COMMANDS.types))

    @command("hello", help="say hello (a test command)")
    class Hello:
        def add_arguments(self, parser) -> None:
            parser.add_argument("--name", default="world", help="whom to greet")
            sub = parser.add_subparsers(dest="how")
            sub.add_parser("loud").add_argument("--times", type=int, default=3, help="how often")

        def run(self, args, console) -> int:
            return 0

    assert "whom to greet (default: world)" in _cmd_help(main, capsys, "hello")
    assert "how often (default: 3)" in _cmd_help(main, capsys, "hello", "loud")
