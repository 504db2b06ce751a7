"""The Ray runner: caching, invalidation, failure isolation, concurrency, --until/--force, logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.runner import plan, print_summary, run
from pipeline.spec import parse_pipeline, with_pools
from pipeline.store import ArtifactStore

DAG = """\
name: dag
stages:
  a: {uses: test.write, with: {text: A, sleep: 0.4, parts: 2}}
  b: {uses: test.write, with: {text: B, sleep: 0.4, parts: 2}}
  c: {uses: test.write, inputs: [a, b], with: {text: C}}
  d: {uses: test.write, inputs: [c], with: {text: D}}
  e: {uses: test.write, inputs: [a], with: {text: E}}
"""


def _run(text: str, store: ArtifactStore, overrides: list[str] | None = None,
         pools: list[str] | None = None, **kw):
    console = Console(record=True, width=200)
    pipeline = with_pools(parse_pipeline(text, overrides=overrides), pools or [])
    result = run(pipeline, store, console=console, live=False, **kw)
    print_summary(result, console)
    return result, console.export_text()


def _statuses(result) -> dict[str, str]:
    return {n: o.status for n, o in result.outcomes.items()}


def _out(store: ArtifactStore, result, name: str) -> str:
    return (store.open(result.outcomes[name].key) / "out.txt").read_text()


def test_run_cache_and_exact_invalidation(tmp_path: Path, ray_local: None) -> None:
    store = ArtifactStore(tmp_path / "store")
    r1, _ = _run(DAG, store)
    assert _statuses(r1) == dict.fromkeys("abcde", "ran")
    assert _out(store, r1, "d") == "D<C<A><B>>"
    assert _out(store, r1, "e") == "E<A>"

    # Unchanged: nothing executes.
    r2, text = _run(DAG, store)
    assert _statuses(r2) == dict.fromkeys("abcde", "cached")
    assert "5 cached" in text and "ran" not in text.split("dag:")[1]

    # One parameter changed: exactly that stage and its descendants.
    r3, _ = _run(DAG, store, overrides=["b.text=B2"])
    assert _statuses(r3) == {"a": "cached", "b": "ran", "c": "ran", "d": "ran", "e": "cached"}
    assert _out(store, r3, "d") == "D<C<A><B2>>"
    assert r3.outcomes["a"].key == r1.outcomes["a"].key
    assert r3.outcomes["c"].key != r1.outcomes["c"].key


def test_independent_stages_run_concurrently(tmp_path: Path, ray_local: None) -> None:
    store = ArtifactStore(tmp_path / "store")
    r, _ = _run(DAG, store)
    man = {n: store.manifest(o.key) for n, o in r.outcomes.items()}
    a, b = man["a"], man["b"]
    assert a["wall_s"] > 0.7 and b["wall_s"] > 0.7
    # Each takes ~0.8 s; run one after the other, their intervals could not overlap.
    assert a["started_unix"] < b["finished_unix"] and b["started_unix"] < a["finished_unix"]
    assert a["metrics"]["pid"] != b["metrics"]["pid"]  # two workers at once


POOLED = """\
pools: {slow: 1}
stages:
  a: {uses: test.write, with: {text: A, sleep: 0.4, parts: 2}, resources: {pool: slow}}
  b: {uses: test.write, with: {text: B, sleep: 0.4, parts: 2}, resources: {pool: slow}}
  c: {uses: test.write, with: {text: C, sleep: 0.4, parts: 2}, resources: {pool: slow}}
  d: {uses: test.write, inputs: [a], with: {text: D}}
"""


def test_a_capped_pool_runs_its_stages_one_at_a_time(tmp_path: Path, ray_local: None) -> None:
    store = ArtifactStore(tmp_path / "store")
    r, _ = _run(POOLED, store)
    assert _statuses(r) == dict.fromkeys("abcd", "ran")
    man = {n: store.manifest(o.key) for n, o in r.outcomes.items()}
    spans = sorted((man[n]["started_unix"], man[n]["finished_unix"]) for n in "abc")
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans  # a pool of 1: no two of a, b, c overlap
    # The same stages with the pool widened by the CLI's --pool run side by side again.
    r2, _ = _run(POOLED.replace("sleep: 0.4", "sleep: 0.41"), store, pools=["slow=3"])
    man2 = {n: store.manifest(o.key) for n, o in r2.outcomes.items()}
    spans2 = sorted((man2[n]["started_unix"], man2[n]["finished_unix"]) for n in "abc")
    assert any(start < end for (_, end), (start, _) in zip(spans2, spans2[1:])), spans2  # overlap


def test_failure_stops_descendants_only(tmp_path: Path, ray_local: None) -> None:
    text = DAG + "  bad: {uses: test.write, inputs: [a], with: {text: X, fail: true}}\n" \
                 "  after_bad: {uses: test.write, inputs: [bad, e]}\n"
    store = ArtifactStore(tmp_path / "store")
    r, out = _run(text, store)
    st = _statuses(r)
    assert st == {"a": "ran", "b": "ran", "c": "ran", "d": "ran", "e": "ran", "bad": "failed",
                  "after_bad": "skipped"}
    bad = r.outcomes["bad"]
    assert bad.error_type == "ValueError" and bad.error == "asked to fail (text='X')"
    assert "ValueError: asked to fail (text='X')" in out
    assert "RayTaskError" not in out and "ray" not in bad.error.lower()
    assert "after_bad skipped: upstream 'bad' did not finish" in out
    assert "asked to fail" in Path(bad.log).read_text()  # the failed attempt's log is kept
    assert not store.is_complete(bad.key) and not r.ok
    record = json.loads(Path(r.record).read_text())
    assert record["stages"]["bad"]["status"] == "failed"


def test_until_and_force(tmp_path: Path, ray_local: None) -> None:
    store = ArtifactStore(tmp_path / "store")
    r, _ = _run(DAG, store, until="c")
    assert _statuses(r) == {"a": "ran", "b": "ran", "c": "ran", "d": "excluded", "e": "excluded"}
    assert r.ok
    p = plan(parse_pipeline(DAG), store)
    assert {n: s.action for n, s in p.items()} == {"a": "cached", "b": "cached", "c": "cached",
                                                   "d": "run", "e": "run"}
    r, _ = _run(DAG, store, force=["b"])
    assert _statuses(r) == {"a": "cached", "b": "ran", "c": "ran", "d": "ran", "e": "ran"}
    with pytest.raises(KeyError, match="unknown stage 'zz'"):
        plan(parse_pipeline(DAG), store, force=["zz"])


def test_artifact_has_manifest_and_log(tmp_path: Path, ray_local: None) -> None:
    store = ArtifactStore(tmp_path / "store")
    r, _ = _run(DAG, store, until="a")
    art = store.open(r.outcomes["a"].key)
    m = art.manifest
    assert m["stage"] == "a" and m["type"] == "test.write" and m["code_version"] == "1"
    assert m["params"] == {"text": "A", "parts": 2, "sleep": 0.4, "wait_for": "", "fail": False}
    assert m["inputs"] == {} and m["metrics"]["parts"] == 2 and m["wall_s"] > 0.7
    assert set(m["versions"]) >= {"stele", "torch", "ray", "python"} and m["host"]
    assert m["files"]["out.txt"] == 1
    log = (art / "log.txt").read_text()
    assert "wrote 2 parts" in log  # the stage's print() went to its own log
    assert "parts: 2/2 done" in log  # and ctx.progress left a line there too
    assert store.verify(art.key) == []


def test_summary_headline_is_what_the_stage_type_names(test_stages: None) -> None:
    from pipeline.runner import _headline

    metrics = {"hits@3": 0.5, "mr": 3.0, "hits@10": 0.75, "mrr": 0.4, "hits@1": 0.25, "note": True}
    # knowledge.evaluate names mrr, hits@1, hits@10, mr: in that order, whatever the manifest's order.
    assert _headline(metrics, "knowledge.evaluate") == "mrr=0.4, hits@1=0.25, hits@10=0.75, mr=3"
    # A type that names none: its first scalar metrics (booleans are not headline numbers).
    assert _headline(metrics, "test.write", limit=2) == "hits@3=0.5, mr=3"
    assert _headline(metrics, "gone.type", limit=1) == "hits@3=0.5"  # an uninstalled type's record


def test_summary_and_progress_lines_print_stage_text_verbatim(test_stages: None) -> None:
    """rich would turn ``:x:`` into an emoji (and ``[b]`` into markup): stage text prints as is."""
    from pipeline.progress import Row, RunDisplay
    from pipeline.runner import Outcome, RunResult

    outcomes = {
        "a": Outcome("a", "test.write", "k" * 64, "failed", error_type="ValueError",
                     error="bad value :x: in [b]col[/b]",
                     traceback='Traceback:\n  File "/data/[v2]/:x:/s.py", line 3, in f\nValueError',
                     log="/store/failed/:x:/log.txt"),
        "b": Outcome("b", "test.write", "j" * 64, "skipped",
                     error="upstream ':smile:' did not finish"),
        "c": Outcome("c", "test.write", "i" * 64, "ran", metrics={"note": "ok :x:"}),
    }
    console = Console(record=True, width=200)
    print_summary(RunResult("r1", "p:x:", "/tmp/:x:/store", outcomes), console)
    display = RunDisplay({"a": Row("a", "test.write")}, console=console, live=False)
    with display:
        display.set("a", "failed", "ValueError: bad :x:")
    text = console.export_text()
    for s in ("bad value :x: in [b]col[/b]", 'File "/data/[v2]/:x:/s.py", line 3, in f',
              "log: /store/failed/:x:/log.txt", "upstream ':smile:' did not finish",
              "note=ok :x:", "p:x:: ", "store /tmp/:x:/store", "failed: ValueError: bad :x:"):
        assert s in text, (s, text)
    assert "\u274c" not in text and "\U0001f604" not in text


CHAIN = """\
name: chain
stages:
  a: {uses: test.write, with: {text: A, parts: 1}}
  c: {uses: test.write, inputs: [a], with: {text: C, parts: 3, sleep: 0.3}}
  d: {uses: test.write, inputs: [c], with: {text: D}}
"""


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler, which ``stele run`` has. Ray Train's ``fit()`` installs its own
    SIGINT handler in the calling process and leaves it there, so after the tests that train
    in-process (the whole suite) another handler is in place."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("moment", ["input_just_finished", "while_submitting"])
def test_ctrl_c_records_every_submitted_stage_interrupted(moment: str, tmp_path: Path,
                                                          ray_local: None, monkeypatch,
                                                          default_sigint: None) -> None:
    """Ctrl-C at the two moments a busy machine made visible (test_kill's Ctrl-C test saw
    ``{'a': 'ran', 'b': 'ran', 'c': 'pending', ...}``): just after the runner learnt that an input
    finished, before it submitted the stage waiting on it; and while it submitted a stage to Ray.
    The signal is raised at exactly that point, so this does not depend on timing."""
    import signal

    from pipeline import runner as runner_mod

    if moment == "input_just_finished":
        class Display(runner_mod.RunDisplay):
            def set(self, name: str, status: str, *args, **kwargs) -> None:
                super().set(name, status, *args, **kwargs)
                if (name, status) == ("a", "ran"):
                    signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(runner_mod, "RunDisplay", Display)
    else:
        real = runner_mod._remote_execute

        class Submit:
            def __init__(self, options) -> None:
                self.options_ = options

            def remote(self, *args):
                ref = self.options_.remote(*args)  # Ray has the task...
                if args[2] == "c":
                    signal.raise_signal(signal.SIGINT)  # ...the runner has not noted it yet
                return ref

        class Remote:
            def __init__(self) -> None:
                self.fn = real()

            def options(self, **kwargs) -> Submit:
                return Submit(self.fn.options(**kwargs))

        monkeypatch.setattr(runner_mod, "_remote_execute", Remote)

    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        run(parse_pipeline(CHAIN), store, console=Console(record=True, width=200), live=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    record = json.loads(next((tmp_path / "store" / "runs").glob("*.json")).read_text())
    statuses = {n: s["status"] for n, s in record["stages"].items()}
    # a finished; c was submitted (or due: its input had finished): interrupted; d never started.
    assert statuses == {"a": "ran", "c": "interrupted", "d": "pending"}, statuses
