"""Stages run on whichever node Ray gives them: a simulated two-node cluster
(``ray.cluster_utils.Cluster``: a head with custom resource ``node_a``, a second node with
``node_b``), every input file and the store on a local S3 server (moto), every stage and every
Ray Train worker pinned to ``node_b`` (``resources: {custom: ...}``,
``scaling: {resources_per_worker: ...}``); the artifacts equal those of the embedded local run of
the same YAML. Also: a custom resource no node offers stops the run before anything starts, and
pins change no artifact key. The cluster test skips without moto or s3fs (``pip install -e
'.[dev]'``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import stele

TRIPLES = "".join(f"{h}\t{r}\t{t}\n" for h, r, t in [
    ("paris", "capital_of", "france"), ("berlin", "capital_of", "germany"),
    ("france", "borders", "germany"), ("london", "capital_of", "england"),
    ("england", "borders", "france"), ("lyon", "city_of", "france"),
    ("munich", "city_of", "germany"), ("beijing", "capital_of", "china")])
LABELS = "".join(f"{i}\t{n}\n" for i, n in [("paris", "Paris"), ("france", "France"),
                                             ("germany", "Germany"), ("berlin", "Berlin"),
                                             ("london", "London"), ("england", "England"),
                                             ("beijing", "Beijing"), ("china", "China")])
DOCS = "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate([
    "Paris is the capital of France.", "Berlin is the capital of Germany.",
    "London is the capital of England.", "Beijing is the capital of China.",
    "France and Germany are a country each.", "The dog and the cat are animals."]))

# Every stage pinned to node_b (the node that holds no files: inputs and store are on S3, only
# the tiny backbone, which is code and config, is a local folder); the training stages' workers too.
PIPE = """\
name: two_node
stages:
  kg:
    uses: knowledge.ingest
    resources: {{custom: {{node_b: 1}}}}
    with:
      sources:
        - {{type: triples, path: "{data}/kg.tsv", entity_labels: "{data}/labels.tsv"}}
      split: {{valid: 0, test: 0}}
  link:
    uses: knowledge.link
    inputs: [kg]
    resources: {{custom: {{node_b: 1}}}}
    with: {{text: "{data}/docs.jsonl"}}
  emb:
    uses: knowledge.embed
    inputs: [kg]
    resources: {{custom: {{node_b: 1}}}}
    with: {{model: transe, dim: 8, epochs: 3, eval_every: 0, batch_size: 4, negatives: 2,
           scaling: {{resources_per_worker: {{node_b: 1}}}}}}
  ernie:
    uses: fusion.pretrain
    inputs: {{text: link, entities: emb}}
    resources: {{custom: {{node_b: 1}}}}
    with: {{recipe: ernie, backbone: "{backbone}", options: {{k_layers: 1}}, steps: 3,
           batch_size: 2, max_length: 32, lr: 1.0e-3, warmup_steps: 0, checkpoint_every: 3,
           scaling: {{resources_per_worker: {{node_b: 1}}}}}}
"""
# The wall times of a training step (fusion.pretrain) or epoch (knowledge.embed) in history.json;
# everything else there, losses included, must be equal.
WALL_TIMES = {"step_s", "epoch_s"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_backbone(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) and its WordPiece tokenizer, saved as a
    local Hugging Face folder (what tests/fusion/conftest.py builds)."""
    from transformers import BertTokenizer

    from fusion.models.backbone import random_backbone
    from tests.fusion.conftest import SPECIAL, SUBWORDS, WORDS

    words = SPECIAL + sorted(set(WORDS)) + SUBWORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    bb = random_backbone(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                         max_position=64, seed=0)
    bb.model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _comparable(art, store_uri: str) -> dict[str, object]:
    """What a stage wrote, minus what legitimately differs between two runs of it."""
    out: dict[str, object] = {}
    for rel in art.manifest["files"]:
        if rel == "log.txt":  # timestamps, pids, host and node names
            continue
        if rel.startswith("tb/"):  # TensorBoard event files: wall times in every record, host in the name
            continue
        # Where the store is (ERNIE's recipe.json names the entity artifact it read by its URI).
        data = (art.path / rel).read_bytes().replace(store_uri.encode(), b"<store>")
        if rel == "history.json":  # per-step wall times beside the losses
            rows = json.loads(data)
            assert all(WALL_TIMES & set(row) for row in rows), rows[0]
            data = [{k: v for k, v in row.items() if k not in WALL_TIMES} for row in rows]
        out[rel] = data
    return out


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A moto S3 server on a free port, with the bucket ``stele-two-node``; its credentials and
    endpoint are set in this process's environment, which the cluster's nodes (started from this
    process) and so their workers inherit, as a real cluster's nodes would have them configured.
    The endpoint goes in fsspec's ``FSSPEC_S3_ENDPOINT_URL`` only (pyarrow's own S3 client would
    not read it): the training stages' checkpoints under the store's ``state/`` must go through
    the fsspec filesystem that :func:`pipeline.train.fit` hands Ray Train."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # fsspec read its FSSPEC_* variables when this process imported it: set its config here (the
    # nodes and the stele subprocesses, started later, read the variable themselves)
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("stele-two-node")
    try:
        yield fs, env
    finally:
        server.stop()


@pytest.fixture
def two_nodes(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A head node (2 CPUs, custom resource ``node_a``) and a second node (2 CPUs, ``node_b``).
    The nodes take stele's Ray settings from the environment, as ``init_ray`` gives them to the
    embedded Ray (on a real cluster, ``ray start`` runs with the node's own environment)."""
    from ray.cluster_utils import Cluster

    from pipeline.ray_utils import _LOCAL_ENV

    for k, v in _LOCAL_ENV.items():
        monkeypatch.setenv(k, v)
    # Where the nodes' stages download their input artifacts: a fresh folder, not ~/.cache/stele
    # (which may hold the same keys from an earlier run), so that they read them from S3.
    monkeypatch.setenv("STELE_CACHE", str(tmp_path / "node-cache"))
    # Started without a dashboard, like the embedded Ray: no State API for Ray Train's
    # placement-group cleaner to poll (pipeline.train._trainer_class).
    monkeypatch.setenv("STELE_RAY_STATE_API", "0")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 100}, "include_dashboard": False})
    try:
        node_b = cluster.add_node(num_cpus=2, resources={"node_b": 100})
        cluster.wait_for_nodes()
        yield cluster, cluster.head_node, node_b
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_stages_pinned_to_the_node_without_files_equal_the_local_run(
        tmp_path: Path, two_nodes, s3_server, plugin_env: dict[str, str]) -> None:
    from pipeline.store import ArtifactStore

    cluster, head, node_b = two_nodes
    s3, s3_env = s3_server
    for name, text in (("kg.tsv", TRIPLES), ("labels.tsv", LABELS), ("docs.jsonl", DOCS)):
        s3.pipe_file(f"stele-two-node/data/{name}", text.encode())
    backbone = _tiny_backbone(tmp_path / "backbone")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPE.format(data="s3://stele-two-node/data", backbone=backbone))
    env = {**plugin_env, **s3_env}

    r = stele("run", str(pipeline), "--address", cluster.address, "--store",
              "s3://stele-two-node/store", "--no-live", env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "two_node: 4 ran" in r.stdout, r.stdout
    # The same YAML on an embedded local Ray: one node, given node_b too (Ray's
    # RAY_OVERRIDE_RESOURCES, as its autoscaler sets it), else its pins could never be met.
    local_env = {**env, "RAY_OVERRIDE_RESOURCES": json.dumps({"node_b": 100})}
    r = stele("run", str(pipeline), "--store", str(tmp_path / "local"), "--no-live",
              env=local_env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "two_node: 4 ran" in r.stdout, r.stdout

    remote, local = ArtifactStore("s3://stele-two-node/store"), ArtifactStore(tmp_path / "local")
    assert s3.exists("stele-two-node/store/artifacts") and len(remote.keys()) == 4
    assert sorted(remote.keys()) == sorted(local.keys())  # same parameters and inputs: same keys
    compared: dict[str, set[str]] = {}
    for key in remote.keys():
        stage = remote.manifest(key)["stage"]
        assert remote.manifest(key)["params"] == local.manifest(key)["params"], stage
        assert remote.manifest(key)["resources"]["custom"] == {"node_b": 1}, stage
        art = remote.open(key, cache_dir=str(tmp_path / "test-cache"))  # this run's files
        got = _comparable(art, remote.uri)
        assert got == _comparable(local.open(key), local.uri), stage
        compared[stage] = set(got)
        # The stage's task ran on node_b: its log names the Ray node it ran on.
        log = (art.path / "log.txt").read_text()
        assert f"ray node {node_b.node_id}" in log, (stage, log[:400])
        assert head.node_id not in log, stage

    # What was compared: the trained weights too, not only tables.
    assert {"triples.parquet", "entities.parquet"} <= compared["kg"], compared
    assert "mentions.parquet" in compared["link"], compared
    assert {"embeddings.safetensors", "history.json"} <= compared["emb"], compared
    assert {"model.safetensors", "entity_table.safetensors", "history.json", "losses.png",
            "recipe.json"} <= compared["ernie"], compared

    # A custom resource no node offers: one line naming the stage and the resource, nothing ran.
    bad = tmp_path / "bad.yaml"
    bad.write_text(pipeline.read_text().replace("{node_b: 1}", "{node_c: 1}", 1))  # kg's
    r = stele("run", str(bad), "--address", cluster.address, "--store", str(tmp_path / "bad"),
              "--no-live", env=env, cwd=tmp_path, timeout=300)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stdout + r.stderr
    assert "stages.kg.resources.custom" in err[0] and "'kg'" in err[0] and "'node_c'" in err[0], err
    assert "node_a, node_b" in err[0], err  # what the cluster does offer
    assert not ArtifactStore(tmp_path / "bad").keys()


# ----------------------------------------------------------------------- fast: no cluster needed
PINNED = """\
stages:
  a: {uses: test.write, with: {text: x}%s}
  emb:
    uses: knowledge.embed
    inputs: {kg: k}
    with: {epochs: 1%s}
  k: {uses: knowledge.ingest, with: {sources: [{type: triples, path: /dev/null}]}}
"""


def _pinned(stage: str = "", scaling: str = "") -> str:
    return PINNED % (f", resources: {{custom: {stage}}}" if stage else "",
                     f", scaling: {{resources_per_worker: {scaling}}}" if scaling else "")


def test_pins_change_no_artifact_key(tmp_path: Path, test_stages: None) -> None:
    from pipeline.registry import Resources
    from pipeline.runner import plan
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore
    from pipeline.train import ScalingParams

    # Unset, the new fields are left out of every dump: manifests, parameters and keys as before.
    assert Resources().model_dump() == {"cpus": 1.0, "gpus": 0.0, "pool": None}
    assert "resources_per_worker" not in ScalingParams().model_dump(mode="json")
    store = ArtifactStore(tmp_path / "store")
    plain = parse_pipeline(_pinned())
    pinned = parse_pipeline(_pinned(stage="{node_b: 1}"))
    # A stage's resources are placement: not part of its key.
    assert ({n: p.key for n, p in plan(plain, store).items()}
            == {n: p.key for n, p in plan(pinned, store).items()})
    assert pinned.stages["a"].resources.custom == {"node_b": 1.0}
    assert pinned.stages["a"].resources.model_dump()["custom"] == {"node_b": 1.0}
    # Training stages keep their type's cpus: 0 and pool beside a pin.
    p = parse_pipeline(_pinned().replace("with: {epochs: 1}",
                                         "resources: {custom: {node_b: 1}}\n    with: {epochs: 1}"))
    assert p.stages["emb"].resources.model_dump() == {"cpus": 0, "gpus": 0, "pool": "train",
                                                      "custom": {"node_b": 1}}
    # Pinned training workers are a training parameter (like scaling's other fields): in the
    # stage's parameters, handed on to Ray Train's resources_per_worker.
    w = parse_pipeline(_pinned(scaling="{node_b: 0.5}")).stages["emb"].params
    assert w.scaling.resources_per_worker == {"node_b": 0.5}
    assert w.model_dump(mode="json")["scaling"]["resources_per_worker"] == {"node_b": 0.5}


@pytest.mark.parametrize("custom, message", [
    ("{CPU: 1}", "ask for CPU with cpus:, not under custom"),
    ("{node_b: 0}", "custom resource 'node_b': the amount must be > 0"),
])
def test_bad_custom_resources_are_spec_errors(custom: str, message: str, plan_error,
                                              test_stages: None) -> None:
    _, line = plan_error(f"stages:\n  a:\n    uses: test.write\n    resources: {{custom: {custom}}}\n")
    assert ":4: stages.a.resources.custom" in line and message in line, line


def _fake_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "Resources": {"CPU": 2.0, "node:127.0.0.1": 1.0, "node_a": 1.0}},
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9, "node_b": 2.0}},
        {"Alive": False, "Resources": {"CPU": 2.0, "node_c": 1.0}}])  # a dead node offers nothing


@pytest.mark.parametrize("stage, scaling, where, message", [
    ("{node_c: 1}", "", "stages.a.resources.custom",
     "stage 'a' would wait forever for custom resource 'node_c': no node of the Ray cluster offers "
     "it (custom resources: node_a, node_b)"),
    ("{node_b: 3}", "", "stages.a.resources.custom",
     "stage 'a' would wait forever for custom resource 'node_b': it asks for 3, no node offers "
     "more than 2"),
    ("", "{node_z: 0.1}", "stages.emb.with.scaling.resources_per_worker",
     "stage 'emb' would wait forever for custom resource 'node_z'"),
])
def test_a_custom_resource_no_node_offers_stops_the_run(
        stage: str, scaling: str, where: str, message: str, monkeypatch: pytest.MonkeyPatch,
        test_stages: None) -> None:
    from pipeline.errors import SpecError
    from pipeline.runner import check_custom_resources
    from pipeline.spec import parse_pipeline

    _fake_nodes(monkeypatch)
    p = parse_pipeline(_pinned(stage, scaling), file="p.yaml")
    with pytest.raises(SpecError) as e:
        check_custom_resources(p, list(p.stages))
    assert str(e.value).startswith(f"p.yaml:") and f" {where}: {message}" in str(e.value)
    assert "\n" not in str(e.value)
    # Only stages that will run are checked (a cached one asks Ray for nothing).
    check_custom_resources(p, ["k"])


def test_resources_some_node_offers_pass(monkeypatch: pytest.MonkeyPatch,
                                         test_stages: None) -> None:
    from pipeline.runner import check_custom_resources
    from pipeline.spec import parse_pipeline

    _fake_nodes(monkeypatch)
    p = parse_pipeline(_pinned("{node_b: 2}", "{node_a: 0.5}"))
    check_custom_resources(p, list(p.stages))
