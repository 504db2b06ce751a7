"""``stele report``: the run report's content, its CLI, the report ``stele run`` writes, and the page
as headless Chromium shows it (skipped where Debian's ``chromium`` is not installed).

The run is real and small: ``knowledge.ingest`` of PyKEEN's Nations and ``knowledge.evaluate`` run as
stages; a ``test.write`` chain contributes a failed and a skipped stage. ``knowledge.embed`` would
spend ~30 s starting Ray Train, so its artifact is put into the store under the key the run plans
for it (a random TransE model, exactly the files ``knowledge.evaluate`` reads, plus a history): the
run then finds it *cached*, as it would after an earlier run, and evaluates it for real. Stage types
too heavy for a test (``fusion.pretrain``, ``fusion.finetune``) and ``fusion.retrieval`` get
fabricated artifacts in their stages' file formats, added to a copy of the run's record. Their
sections come from the packages that own the types (``stele.report`` entry points); a made-up
``acme.count`` type gets one from a plugin installed for the test.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pipeline import report as rpt
from pipeline.report.assemble import MAX_TYPE_COLUMNS
from pipeline.store import ArtifactStore, artifact_key

from ..conftest import make_plugin_site

PIPE = """\
name: reported
stages:
  kg: {uses: knowledge.ingest, with: {sources: [{type: pykeen, dataset: nations}]}}
  emb: {uses: knowledge.embed, inputs: {kg: kg}, with: {model: transe, dim: 8, epochs: 3, eval_every: 1}}
  ev: {uses: knowledge.evaluate, inputs: {kg: kg, model: emb}}
  a: {uses: test.write, with: {text: A, parts: 1}}
  bad: {uses: test.write, inputs: [a], with: {text: X, parts: 1, fail: true}}
  after_bad: {uses: test.write, inputs: [bad]}
"""
EXTERNAL = "https://example.invalid/thumb.png"
# As many metrics as a real fusion.pretrain manifest holds (losses per objective, throughput,
# resources, corpus counts), with every digit a float has: the by-type table must show only the
# type's headline, rounded.
PRETRAIN_METRICS = {
    "recipe": "ernie", "steps": 7, "examples": 70, "corpus_parts": 2,
    **{f"loss_{o}_first": 5.123456789 - i for i, o in enumerate(("total", "mlm", "dea"))},
    **{f"loss_{o}_last10": 2.123456789 - i / 3 for i, o in enumerate(("total", "mlm", "dea"))},
    "tokens_per_s": 12345.678901, "model_tflops_per_s": 0.000123456789, "mfu": None,
    "train_s": 83.123456, "num_workers": 1, "job_bytes": 123456789,
    **{f"resource_{i}": i * 1.234567891 for i in range(40)},
}
MAX_COLUMNS = 1 + MAX_TYPE_COLUMNS  # a by-type table: the stage, then its metrics
T2M_R1 = 27.6923076923  # text-to-media R@1 of the fabricated retrieval, a number found nowhere else


# ------------------------------------------------------------------------------ fabricated files
def _png(title: str, ys: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(range(1, len(ys) + 1), ys)
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    plt.close(fig)
    return buf.getvalue()


def _thumb(colour: tuple[float, float, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    buf = io.BytesIO()
    plt.imsave(buf, np.ones((8, 8, 3)) * np.array(colour), format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _commit(store: ArtifactStore, key: str, stage: str, stage_type: str, files: dict[str, Any],
            metrics: dict[str, Any], inputs: dict[str, str], params: dict | None = None,
            write: Any = None) -> None:
    """An artifact as the engine commits one: the files, then the manifest (execute_stage's keys).
    ``files``: name -> bytes, text, JSON-able data or a function writing the file; ``write``: a
    function that writes more into the folder."""
    work = store.new_work_dir(key)
    if write is not None:
        write(work)
    for rel, content in files.items():
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content if isinstance(content, str) else json.dumps(content))
    (work / "log.txt").write_text(f"stage {stage} (fabricated for the report test)\n")
    store.commit(key, work, {
        "stage": stage, "type": stage_type, "code_version": "1", "params": params or {},
        "inputs": inputs, "metrics": metrics, "wall_s": 1.5, "started_at": "2026-01-01T00:00:00+0000",
        "finished_at": "2026-01-01T00:00:02+0000", "versions": {"stele": "test"}, "host": "test"})


def _seed_embedding(store: ArtifactStore, key: str, kg_key: str, params: dict) -> None:
    """knowledge.embed's artifact without the training: a random TransE of Nations' size."""
    import torch

    from knowledge.models import build_model, save_model

    torch.manual_seed(0)
    # Nations' size (the ingest stage runs later; knowledge.evaluate refuses a model of another)
    model = build_model("transe", 14, 55, 8, p_norm=1.0, margin=1.0)
    hist = [{"step": 1, "loss": 0.9, "epoch_s": 0.1, "valid_mrr": 0.21},
            {"step": 2, "loss": 0.7, "epoch_s": 0.1, "valid_mrr": 0.24},
            {"step": 3, "loss": 0.55, "epoch_s": 0.1, "valid_mrr": 0.23}]
    _commit(store, key, "emb", "knowledge.embed", {
        "history.json": hist, "training.png": _png("emb", [h["loss"] for h in hist]),
    }, {"epochs": 3, "best_valid_mrr": 0.24, "best_epoch": 2}, {"kg": kg_key}, params,
        write=lambda work: save_model(work, model))


def _fabricated_stages(store: ArtifactStore, emb_key: str) -> dict[str, dict]:
    """fusion.pretrain -> fusion.finetune, and fusion.retrieval, in their stages' file formats."""
    from fusion.finetune.tasks import classification_metrics

    out: dict[str, dict] = {}
    pre_key = artifact_key("fusion.pretrain", "2", {"recipe": "ernie"}, {"entities": emb_key})
    hist = [{"step": s, "loss_mlm": 5.0 - s * 0.4, "loss_dea": 3.0 - s * 0.2, "lr": 1e-4,
             "grad_norm": 1.0} for s in range(1, 8)]
    _commit(store, pre_key, "pretrain", "fusion.pretrain", {
        "history.json": hist, "recipe.json": {"recipe": "ernie", "options": {"k": 2}, "max_length": 32},
        "losses.png": _png("losses", [h["loss_mlm"] for h in hist])},
        PRETRAIN_METRICS, {"entities": emb_key})
    out["pretrain"] = {"key": pre_key, "type": "fusion.pretrain", "inputs": {"entities": emb_key}}

    gold = ["city", "city", "country", "person", "country"]
    pred = ["city", "country", "country", "person", "person"]
    m = classification_metrics(gold, pred)
    ft_key = artifact_key("fusion.finetune", "1", {"task": "entity_typing"}, {"encoder": pre_key})
    metrics_json = {"task": "entity_typing", "encoder": "ernie", "train_examples": 20,
                    "test_examples": 5, "num_labels": 3, "labels": sorted(set(gold)),
                    "test": {k: v for k, v in m.items() if k != "per_label"},
                    "per_label": m["per_label"], "left_out": {"no_type": 2}, "warnings": []}
    _commit(store, ft_key, "finetune", "fusion.finetune", {
        "metrics.json": metrics_json, "history.json": [{"step": s, "loss": 1.0 / s, "lr": 1e-4}
                                                       for s in range(1, 5)],
        "finetune.png": _png("finetune", [1.0, 0.5, 0.33, 0.25])},
        {"task": "entity_typing", "encoder": "ernie", "test_accuracy": m["accuracy"],
         "test_macro_f1": m["macro_f1"]}, {"encoder": pre_key})
    out["finetune"] = {"key": ft_key, "type": "fusion.finetune", "inputs": {"encoder": pre_key},
                       "expected_macro_f1": m["macro_f1"]}

    import pyarrow as pa
    import pyarrow.parquet as pq

    ret_key = artifact_key("fusion.retrieval", "1", {"mode": "rerank"}, {"model": pre_key})
    direction = {"queries": 4, "skipped_no_positive": 0, "R@1": T2M_R1, "R@5": 75.0, "R@10": 100.0,
                 "median_rank": 2.5, "mean_rank": 3.25, "mAP@10": 51.0}
    metrics = {"mode": "rerank", "k": 8, "first_stage": "model's own", "split": "test",
               "counts": {"captions": 4, "media": 4}, "rsum": 400.0,
               "text_to_media": direction, "media_to_text": dict(direction, **{"R@1": 50.0}),
               "recall_curve": {"K": [1, 2, 3, 4], "text_to_media": [25.0, 50.0, 75.0, 100.0],
                                "media_to_text": [50.0, 50.0, 75.0, 100.0]}}
    red, blue = _thumb((1, 0, 0)), _thumb((0, 0, 1))
    examples = [
        {"direction": "text_to_media", "query": {"id": "cap-0", "text": "a red square"},
         "results": [{"id": "img-red", "score": 3.5, "correct": True, "text": "red",
                      "thumbnail": red},
                     {"id": "img-blue", "score": 1.25, "correct": False, "text": "blue",
                      "thumbnail": blue},
                     {"id": "img-gone", "score": 0.5, "correct": False, "text": None,
                      "thumbnail": None},
                     {"id": "img-remote", "score": 0.25, "correct": False, "text": "remote",
                      "thumbnail": EXTERNAL}]},
        {"direction": "media_to_text", "query": {"id": "img-blue", "thumbnail": blue},
         "results": [{"id": "cap-1", "score": 2.0, "correct": True, "text": "a blue square"}]},
    ]
    ranks = pa.table({"direction": ["text_to_media"] * 4 + ["media_to_text"] * 4,
                      "query_id": [f"q{i}" for i in range(8)],
                      "rank": [1.0, 2.0, 3.0, 30.0, 1.0, 1.0, 7.0, None]})

    def write_ranks(p: Path) -> None:
        pq.write_table(ranks, p)

    _commit(store, ret_key, "retrieval", "fusion.retrieval", {
        "metrics.json": metrics, "examples.json": examples, "ranks.parquet": write_ranks,
        "recall_at_k.png": _png("recall", [25, 50, 75, 100]),
        "rank_hist.png": _png("ranks", [3, 1, 0, 1])},
        # The flat metrics the stage returns (fusion.retrieval.stage.evaluate).
        {"mode": "rerank", "k": 8, "captions": 4, "media": 4, "rsum": 400.0,
         "first_stage_rsum": 380.0, "pairs_scored": 32, "eval_s": 0.0123,
         **{f"{d}_{k}": metrics[d][k] for d in ("text_to_media", "media_to_text")
            for k in ("R@1", "R@5", "R@10", "median_rank", "mAP@10", "skipped_no_positive")}},
        {"model": pre_key})
    out["retrieval"] = {"key": ret_key, "type": "fusion.retrieval", "inputs": {"model": pre_key},
                        "metrics": metrics, "examples": examples}
    return out


# ------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    pytest.importorskip("pykeen")
    from pipeline.runner import plan, run
    from pipeline.spec import load_pipeline

    root = tmp_path_factory.mktemp("report")
    spec = root / "reported.yaml"
    spec.write_text(PIPE)
    store = ArtifactStore(root / "store")
    pipe = load_pipeline(spec)
    planned = plan(pipe, store)  # keys depend on parameters and inputs' keys, not on any output
    _seed_embedding(store, planned["emb"].key, planned["kg"].key,
                    pipe.stages["emb"].params.model_dump(mode="json"))
    result = run(pipe, store, live=False)
    statuses = {n: o.status for n, o in result.outcomes.items()}
    assert statuses == {"kg": "ran", "emb": "cached", "ev": "ran", "a": "ran", "bad": "failed",
                        "after_bad": "skipped"}, {n: o.traceback for n, o in result.outcomes.items()}

    # A second record: the run plus the fabricated fusion stages (a later id: it is "latest").
    record = json.loads(Path(result.record).read_text())
    fab = _fabricated_stages(store, planned["emb"].key)
    big = dict(record, run_id="29990101-000000-f0f0f0", stages=dict(record["stages"]))
    for name, f in fab.items():
        big["stages"][name] = {"name": name, "type": f["type"], "key": f["key"], "status": "cached",
                               "wall_s": 1.5, "error_type": "", "error": "", "traceback": "",
                               "log": "", "metrics": store.manifest(f["key"])["metrics"]}
    store.record_run(big)
    return {"store": store, "spec": spec, "run_id": result.run_id, "record": big, "fab": fab,
            "root": root}


class _Dom(HTMLParser):
    """The few things the checks need from a page: elements with their attributes, and text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _expected_pngs(store: ArtifactStore, record: dict) -> dict[str, bytes]:
    """stage/file -> bytes of every PNG of every artifact of the run, read from the store itself."""
    out = {}
    for name, o in record["stages"].items():
        if o["status"] in ("ran", "cached"):
            for rel in store.manifest(o["key"])["files"]:
                if rel.endswith(".png"):
                    out[f"{name}/{rel}"] = Path(store.artifact_path(o["key"]), rel).read_bytes()
    return out


@pytest.fixture(scope="module")
def page(reported: dict[str, Any]) -> dict[str, Any]:
    dest, report = rpt.write_report(reported["store"], reported["record"],
                                    reported["root"] / "page" / "report.html")
    text = Path(dest).read_text()
    return {"path": Path(dest), "text": text, "dom": _Dom(text), "report": report}


# ------------------------------------------------------------------------------ content
def test_every_stage_with_its_status_timing_and_order(reported, page) -> None:
    dom, record = page["dom"], reported["record"]
    sections = {a["data-stage"]: a for a in dom.all("section", **{"class": "stage"})}
    assert set(sections) == set(record["stages"])
    for name, o in record["stages"].items():
        assert sections[name]["data-status"] == o["status"]
        assert sections[name]["data-type"] == o["type"]
    # Dependency order (the record itself is sorted by name): inputs come first.
    order = [s.name for s in page["report"].stages]
    assert order.index("kg") < order.index("emb") < order.index("ev")
    assert order.index("a") < order.index("bad") < order.index("after_bad")
    assert order.index("pretrain") < order.index("finetune")
    text = page["text"]
    assert "ValueError" in text and "asked to fail (text=&#39;X&#39;)" in text
    assert "upstream &#39;bad&#39; did not finish" in text
    ev = next(s for s in page["report"].stages if s.name == "ev")
    assert ev.wall_s == record["stages"]["ev"]["wall_s"] and rpt.fmt_seconds(ev.wall_s) in text
    assert "stage ev (knowledge.evaluate v1)" in ev.log_tail  # the artifact's own log


def test_dag_has_a_node_per_stage_and_the_recorded_edges(page) -> None:
    dom = page["dom"]
    nodes = {a["data-stage"] for a in dom.all("g", **{"class": "node"})}
    assert nodes == {s.name for s in page["report"].stages}
    titles = " | ".join(page["dom"].text)
    # From manifests (what ran or was cached) and, for the failed and skipped stages that left no
    # artifact, from the pipeline file.
    for edge in ("kg → emb (as kg)", "kg → ev (as kg)", "emb → ev (as model)", "a → bad (as a)",
                 "bad → after_bad (as bad)", "pretrain → finetune (as encoder)",
                 "pretrain → retrieval (as model)", "emb → pretrain (as entities)"):
        assert edge in titles, edge
    assert len(dom.all("path", **{"class": "edge"})) == 8


def test_every_png_is_embedded_byte_for_byte_with_numbers(reported, page) -> None:
    expected = _expected_pngs(reported["store"], reported["record"])
    assert set(expected) == {"kg/stats.png", "emb/training.png", "ev/hits_at_k.png",
                             "pretrain/losses.png", "finetune/finetune.png",
                             "retrieval/recall_at_k.png", "retrieval/rank_hist.png"}
    figures = re.findall(r'<figure class="figure" data-file="([^"]+)">\s*<img src="data:image/png;'
                         r'base64,([^"]+)"(.*?)</figure>', page["text"], re.S)
    assert {f for f, _, _ in figures} == set(expected)
    for file, b64, rest in figures:
        assert base64.b64decode(b64) == expected[file], file
        # The numbers behind the figure: at least one table with rows, inside its <details>.
        assert 'class="numbers-behind"' in rest and "<tbody>\n<tr>" in rest, file


def test_type_sections_show_the_numbers_the_stages_wrote(reported, page) -> None:
    store, text = reported["store"], page["text"]
    views = {s.name: s for s in page["report"].stages}
    tables = {t.title: t for s in page["report"].stages for sec in s.sections for t in sec.tables}

    # KG statistics, from stats.json.
    stats = json.loads(Path(store.artifact_path(views["kg"].key), "stats.json").read_text())
    graph = dict(tables["graph"].rows)
    assert graph["entities"] == stats["entities"] == 14 and graph["triples"] == stats["triples"]
    # Link prediction, from metrics.json: the table and the Hits@k numbers behind the plot.
    m = json.loads(Path(store.artifact_path(views["ev"].key), "metrics.json").read_text())
    lp = next(t for title, t in tables.items() if title.startswith("link prediction on test"))
    row = next(r for r in lp.rows if r[:2] == ["filtered", "both"])
    assert row[2] == m["filtered"]["both"]["mrr"] and row[6] == m["filtered"]["both"]["hits@10"]
    hits = views["ev"].figure("hits_at_k.png").numbers[0]
    assert hits.columns == ["k", "both", "head", "tail"] and len(hits.rows) == 10
    assert hits.rows[9][1] == pytest.approx(m["filtered"]["both"]["hits@10"])
    assert rpt.fmt(m["filtered"]["both"]["mrr"]) in text
    # KGE training curve: history.json, one row per epoch.
    curve = views["emb"].figure("training.png").numbers[0]
    assert [r[curve.columns.index("loss")] for r in curve.rows] == [0.9, 0.7, 0.55]
    # Pretraining: a loss row per objective.
    per_obj = {r[0]: r for r in tables["loss per objective"].rows}
    assert set(per_obj) == {"mlm", "dea"} and per_obj["mlm"][1] == 7
    assert per_obj["mlm"][3] == pytest.approx(5.0 - 7 * 0.4)
    # Downstream: scores and per-label table.
    scores = dict(tables["test scores"].rows)
    assert scores["test macro_f1"] == reported["fab"]["finetune"]["expected_macro_f1"]
    # The per-label table explains finetune.png (its F1 bars): behind the figure, not in the section.
    per = views["finetune"].figure("finetune.png").numbers[1]
    assert per.title == "per label (test)" and "per label (test)" not in tables
    assert {r[0] for r in per.rows} == {"city", "country", "person"}
    # Results by stage type: one table per type that produced metrics.
    assert {t.title for t in page["report"].by_type} >= {"knowledge.ingest", "knowledge.evaluate",
                                                        "fusion.finetune", "fusion.retrieval"}


def _in_view(text: str) -> str:
    """The page as a reader first sees it: without closed ``<details>`` (the numbers behind the
    figures, all metrics, parameters, logs), scripts and styles."""
    return re.sub(r"<details.*?</details>|<script.*?</script>|<style.*?</style>", "", text,
                  flags=re.S)


def test_by_type_tables_show_the_headline_metrics_only(page) -> None:
    by_type = {t.title: t for t in page["report"].by_type}
    views = {s.name: s for s in page["report"].stages}
    # fusion.pretrain's declared headline, out of its ~60 metrics; mfu is None for every stage of
    # the type, so it is no column.
    pre = by_type["fusion.pretrain"]
    assert pre.columns == ["stage", "recipe", "steps", "loss_total_first", "loss_total_last10",
                           "tokens_per_s"]
    assert [text for text, _ in pre.cells()[0]] == ["pretrain", "ernie", "7", "5.123", "2.123",
                                                    "12,346"]
    assert by_type["fusion.retrieval"].columns == [
        "stage", "mode", "k", "captions", "media", "text_to_media_R@1", "media_to_text_R@1", "rsum"]
    # A type that names none (the test plugin's test.write): its first few numbers and strings.
    assert by_type["test.write"].columns[1:] == rpt.headline_keys(views["a"].metrics, "test.write")
    assert all(2 <= len(t.columns) <= MAX_COLUMNS for t in by_type.values())
    # Every metric stays one click away, in the stage's own section; its rows link there.
    pre_html = re.search(r'<section class="stage" id="stage-pretrain".*?</section>', page["text"],
                         re.S).group(0)
    [all_metrics] = re.findall(r'<details class="all-metrics">.*?</details>', pre_html, re.S)
    assert all(f"<td>{k}</td>" in all_metrics for k in PRETRAIN_METRICS)
    assert "<td>train_s</td><td class=\"num\">1 m 23 s</td>" in all_metrics
    by_type_html = page["text"][page["text"].index('id="by-type"'):]
    assert '<a href="#stage-pretrain">pretrain</a>' in by_type_html


def test_headline_keys_follow_the_type_or_take_its_first_numbers() -> None:
    m = {"flag": True, "a": 1, "b": "x", "nested": {"c": 1}, "c": 0.5, "d": 1, "e": 2, "f": 3, "g": 4}
    assert rpt.headline_keys(m, "gone.type") == ["a", "b", "c", "d", "e", "f"]  # no longer installed
    assert rpt.headline_keys({"hits@10": 0.5, "x": 1, "mrr": 0.25}, "knowledge.evaluate") == \
        ["mrr", "hits@10"]  # the type's order
    assert rpt.headline_keys({"loss_total_last10": 1.0, "loss_mlm_last10": 2.0, "steps": 3,
                              "mfu": None}, "fusion.pretrain") == ["steps", "loss_total_last10", "mfu"]


def test_numbers_are_rounded_for_reading(page) -> None:
    fmt, cell = rpt.fmt, rpt.fmt_cell
    assert [fmt(0.123456789), fmt(25.0), fmt(238.46153), fmt(12345.678), fmt(123456), fmt(7),
            fmt(0.000123456), fmt(None), fmt(True)] == \
        ["0.1235", "25", "238.5", "12,346", "123,456", "7", "1.235e-04", "—", "true"]
    assert [cell(83.123456, "train_s"), cell(0.0123, "eval_s"), cell(12345.678, "tokens_per_s")] \
        == ["1 m 23 s", "0.0123 s", "12,346"]
    text = page["text"]
    cells = re.findall(r'<td class="num">([^<]*)</td>', text)
    assert len(cells) > 100
    for c in cells:  # at most 4 significant digits wherever a fraction is shown
        mantissa = c.split(" ")[0].split("e")[0].lstrip("-")
        if "." in mantissa:
            assert len(mantissa.replace(".", "").lstrip("0")) <= 4, c
    # The full precision is in the artifact's files, not on the page.
    assert "5.123456789" not in text and "12345.678901" not in text and str(T2M_R1) not in text


def test_each_number_and_figure_is_shown_once(page) -> None:
    text, view = page["text"], _in_view(page["text"])
    r1 = f">{rpt.fmt(T2M_R1)}<"
    # Text-to-media R@1 was shown four times: the overview's headline, the by-type table, the
    # stage's metrics table and the retrieval section. Now: once as a result in its type's table
    # and once in the stage's section (the recall table, among the other directions and cut-offs).
    by_type = view[view.index('id="by-type"'):view.index('<section class="stage"')]
    overview = view[view.index('id="stages"'):view.index('id="by-type"')]
    assert by_type.count(r1) == 1 and r1 not in overview and view.count(r1) == 2
    # No table twice in a stage (a section's table explaining a figure is behind the figure only),
    # no figure twice on the page.
    for sec in re.findall(r'<section class="stage".*?</section>', text, re.S):
        titles = re.findall(r'data-title="([^"]*)"', sec)
        assert len(titles) == len(set(titles)), titles
    assert text.count('data-title="recall@K (%)"') == 1
    files = re.findall(r'<figure class="figure" data-file="([^"]+)"', text)
    assert len(files) == len(set(files)) == 7


def test_no_test_hook_in_view(page) -> None:
    [check] = page["dom"].all("div", id="page-check")
    assert "hidden" in check  # the headless check reads its data attributes; a reader sees nothing
    assert "page check" not in _in_view(page["text"]).lower()


def test_retrieval_section_follows_the_examples_contract(reported, page) -> None:
    ret = next(s for s in page["report"].stages if s.name == "retrieval")
    sec = next(s for s in ret.sections if s.title == "Retrieval")
    by_title = {t.title: t for t in sec.tables}
    rec = by_title["recall by direction (%)"]
    assert [r[0] for r in rec.rows] == ["text_to_media", "media_to_text"]
    assert rec.rows[1][rec.columns.index("R@1")] == 50.0
    # The recall@K table explains recall_at_k.png: shown behind the figure, not again in the section.
    [curve] = ret.figure("recall_at_k.png").numbers
    assert curve.title == "recall@K (%)" and curve.rows[-1] == [4, 100.0, 100.0]
    assert "recall@K (%)" not in by_title
    bins = ret.figure("rank_hist.png").numbers[0]
    assert dict((r[0], r[1:]) for r in bins.rows)["1"] == [1, 2]  # rank 1: one t2m, two m2t
    assert dict((r[0], r[1:]) for r in bins.rows)["no correct item"] == [0, 1]
    # The page: a block per example, thumbnails embedded, the correct result marked; the remote
    # thumbnail is dropped (the page never fetches anything) and a missing one is no <img>.
    dom, text = page["dom"], page["text"]
    assert [a["data-direction"] for a in dom.all("div", **{"class": "example"})] == \
        ["text_to_media", "media_to_text"]
    thumbs = dom.all("img", **{"class": "thumb"})
    assert [t["alt"] for t in thumbs] == ["img-red", "img-blue", "img-blue"]
    assert all(t["src"].startswith("data:image/png;base64,") for t in thumbs)
    assert EXTERNAL not in text and "(no text or thumbnail)" in text
    assert len(dom.all("li", **{"class": "correct"})) == 2


def test_page_is_self_contained(page) -> None:
    dom = page["dom"]
    for tag, attrs in dom.elements:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, name, value[:80])
    assert "<link" not in page["text"] and "@import" not in page["text"]
    csp = dom.all("meta", http_equiv="Content-Security-Policy")
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_summary_text_lists_every_stage(reported, page) -> None:
    text = rpt.summary_text(page["report"])
    lines = text.splitlines()
    assert lines[0].startswith("reported: run 29990101-000000-f0f0f0 (")
    for name, o in reported["record"]["stages"].items():
        line = next(ln for ln in lines if ln.split()[0] == name)
        assert f" {o['status']} " in line
    assert "ValueError: asked to fail" in text and "mrr=" in text


def test_a_new_stage_type_adds_one_section_and_a_broken_one_costs_only_its_section(
        reported, monkeypatch) -> None:
    def write_section(sv: rpt.StageView) -> None:
        sv.add(rpt.Section("Output", [rpt.kv_table("out.txt", {
            "text": sv.read_bytes("out.txt").decode()}, "out.txt")]))

    def broken(sv: rpt.StageView) -> None:
        raise RuntimeError("boom")

    rpt.SECTIONS.load_plugins()  # first, so that loading them does not undo the patches below
    monkeypatch.setitem(rpt.SECTIONS.types, "test.write", write_section)
    monkeypatch.setitem(rpt.SECTIONS.types, "knowledge.ingest", broken)
    report = rpt.build_report(reported["store"], reported["record"])
    views = {s.name: s for s in report.stages}
    assert views["a"].sections[0].tables[0].rows == [["text", "A"]]
    kg = views["kg"]
    assert kg.sections == [] and kg.notes == [
        "the knowledge.ingest section could not be built: RuntimeError: boom"]
    # The figure is still there, with the artifact's JSON files as its numbers.
    fig = kg.figure("stats.png")
    assert fig is not None and {t.source for t in fig.numbers} >= {"stats.json"}
    assert "<section class=\"stage\" id=\"stage-kg\"" in rpt.render_html(report)


ACME_SECTION = """\
from pipeline.report import Section, StageView, kv_table, report_section


@report_section("acme.count")
def _count(sv: StageView) -> None:
    sv.add(Section("Acme counts", [kv_table("counts", sv.read_json("counts.json"), "counts.json")]))
"""


def test_a_third_party_stage_type_gets_its_section_through_an_entry_point(
        reported, tmp_path: Path, monkeypatch) -> None:
    """A section for a stage type stele knows nothing about, from a separately installed plugin
    (``stele.report`` entry point); a plugin that fails to import costs only its own sections."""
    for name, src in (("acme_report", ACME_SECTION), ("broken_report", "raise ImportError('no acme')\n")):
        (tmp_path / f"{name}.py").write_text(src)
        site = make_plugin_site(tmp_path / name, tmp_path / f"{name}.py", name=name, group="stele.report")
        monkeypatch.syspath_prepend(str(site))
    sections = rpt.SECTIONS
    sections.load_plugins()  # stele's own; then load again, with the two plugins installed
    assert {"knowledge.ingest", "knowledge.embed", "knowledge.evaluate", "knowledge.link",
            "vision.features", "speech.features", "fusion.pretrain", "fusion.finetune",
            "fusion.retrieval"} <= set(sections.types)
    monkeypatch.setattr(sections, "types", dict(sections.types))
    monkeypatch.setattr(sections, "plugin_errors", {})
    monkeypatch.setattr(sections, "_loaded", False)

    store = reported["store"]
    key = artifact_key("acme.count", "1", {}, {})
    _commit(store, key, "acme", "acme.count", {"counts.json": {"widgets": 3, "gadgets": 4}},
            {"widgets": 3}, {})
    record = dict(reported["record"], stages=dict(reported["record"]["stages"]))
    record["stages"]["acme"] = {"name": "acme", "type": "acme.count", "key": key, "status": "cached",
                                "wall_s": 1.5, "error_type": "", "error": "", "traceback": "",
                                "log": "", "metrics": {"widgets": 3}}
    report = rpt.build_report(store, record)
    views = {s.name: s for s in report.stages}
    assert [sec.title for sec in views["acme"].sections] == ["Acme counts"]
    assert views["acme"].sections[0].tables[0].rows == [["widgets", 3], ["gadgets", 4]]
    assert views["acme"].notes == []
    assert [sec.title for sec in views["kg"].sections] == ["Knowledge graph statistics"]
    [(plugin, error)] = sections.plugin_errors.items()
    assert plugin == "broken_report = broken_report" and error == "ImportError: no acme"
    page = rpt.render_html(report)
    assert 'data-stage="acme"' in page and "Acme counts" in page


def test_table_subsampling_says_so() -> None:
    t = rpt.Table("h", ["step"], [[i] for i in range(1000)], "history.json")
    assert len(t.rows) == rpt.MAX_ROWS and t.rows[0] == [0] and t.rows[-1] == [999]
    assert t.note.startswith(f"{rpt.MAX_ROWS} of 1000 rows shown") and "history.json" in t.note


# ------------------------------------------------------------------------------ CLI
def test_cli_report_by_id_prefix_latest_and_pipeline(reported, capsys) -> None:
    from pipeline.cli import main

    store, run_id = str(reported["store"].uri), reported["run_id"]
    out = reported["root"] / "cli.html"
    assert main(["report", run_id[:17], "--store", store, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"run {run_id}" in printed and f"report: {out}" in printed and out.exists()
    assert re.search(r"\n  bad +test\.write +failed ", printed)

    assert main(["report", "--store", store]) == 0  # latest, into the store
    printed = capsys.readouterr().out
    assert "run 29990101-000000-f0f0f0" in printed
    assert (Path(store) / "reports" / "29990101-000000-f0f0f0.html").exists()

    # A pipeline file: its latest run (the fabricated record names the same file, so take it).
    assert main(["report", str(reported["spec"]), "--store", store]) == 0
    assert "run 29990101-000000-f0f0f0" in capsys.readouterr().out

    assert main(["report", "nosuchrun", "--store", store]) == 2
    assert "no run 'nosuchrun'" in capsys.readouterr().err
    assert main(["report", "2", "--store", store]) == 2  # a prefix of several runs
    assert "ambiguous" in capsys.readouterr().err


def test_stele_run_writes_the_report_and_survives_a_report_failure(reported, capsys,
                                                                   monkeypatch) -> None:
    from pipeline.cli import main

    store = str(reported["store"].uri)
    rc = main(["run", str(reported["spec"]), "--store", store, "--no-live"])
    printed = capsys.readouterr().out
    assert rc == 1  # 'bad' fails again
    path = re.search(r"^report: (.+)$", printed, re.M).group(1)
    assert Path(path).exists() and Path(path).parent == Path(store) / "reports"
    assert 'data-stage="after_bad"' in Path(path).read_text()

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("pipeline.report.output.build_report", broken)  # what write_report calls
    rc = main(["run", str(reported["spec"]), "--store", store, "--no-live"])
    printed = capsys.readouterr().out
    assert rc == 1 and "warning: report not written: RuntimeError: disk full" in printed
    assert "report: " not in printed


# ------------------------------------------------------------------------------ headless Chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(page: Path, profile: Path) -> tuple[_Dom, list[str]]:
    """The DOM after the page's scripts ran, and the page's console messages."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         "--window-size=1280,900",  # a laptop screen: the width the by-type tables must fit
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return _Dom(proc.stdout), console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_page_in_headless_chromium(reported, page, tmp_path: Path) -> None:
    dom, console = _chromium(page["path"], tmp_path / "profile")
    assert console == []
    [check] = dom.all("div", id="page-check")
    assert json.loads(check["data-errors"]) == [] and check["data-status"] == "good"
    assert "hidden" in check and "page check" not in "".join(dom.text)
    expected = _expected_pngs(reported["store"], reported["record"])
    thumbs = 3  # red and blue in the first example, blue as the second's query
    assert int(check["data-images"]) == int(check["data-loaded"]) == len(expected) + thumbs
    imgs = dom.all("img")
    assert len(imgs) == len(expected) + thumbs and all(i.get("data-ok") == "1" for i in imgs)
    assert {a["data-file"] for a in dom.all("figure")} == set(expected)
    assert int(check["data-figures"]) == len(expected)
    assert int(check["data-tables"]) == len(page["dom"].all("table")) > 20
    assert {a["data-stage"] for a in dom.all("section", **{"class": "stage"})} == \
        set(reported["record"]["stages"])
    # The by-type tables as laid out: each fits the page's width (no sideways scrolling) with a
    # bounded number of columns, the widest one (fusion.pretrain's) included.
    widths = json.loads(check["data-by-type"])
    assert [w["title"] for w in widths] == [t.title for t in page["report"].by_type]
    for w in widths:
        assert 2 <= w["columns"] <= MAX_COLUMNS and 0 < w["width"] <= w["room"], w


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_headless_check_catches_a_broken_image_and_an_external_url(page, tmp_path: Path) -> None:
    """The harness can fail: an undecodable image and a remote one are both reported."""
    bad = page["text"].replace(
        '<div id="page-check"',
        f'<img id="broken" src="data:image/png;base64,AAAA"><img id="remote" src="{EXTERNAL}">'
        '<div id="page-check"')
    path = tmp_path / "bad.html"
    path.write_text(bad)
    dom, console = _chromium(path, tmp_path / "profile")
    assert any("Content Security Policy" in ln and "example.invalid" in ln for ln in console)
    [check] = dom.all("div", id="page-check")
    assert check["data-status"] == "bad" and int(check["data-loaded"]) == int(check["data-images"]) - 2
    assert dom.all("img", id="broken")[0]["data-ok"] == "0"
    assert dom.all("img", id="remote")[0]["data-ok"] == "0"
