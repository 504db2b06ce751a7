"""The same YAML against a separately started Ray cluster (`ray start --head`, then --address)
gives the same artifacts as the embedded default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import ArtifactStore

from ..conftest import stele
from .test_kill import PIPELINE, _session_processes

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _contents(store: ArtifactStore) -> dict[str, dict[str, bytes]]:
    out = {}
    for key in store.keys():
        art = store.open(key)
        out[key] = {rel: (art.path / rel).read_bytes() for rel in art.manifest["files"]
                    if rel != "log.txt"}  # logs carry timestamps and pids
    return out


@pytest.mark.slow
def test_same_yaml_on_a_started_cluster(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE)
    embedded, cluster = tmp_path / "embedded", tmp_path / "cluster"
    stele("run", str(pipeline), "--store", str(embedded), "--no-live", env=plugin_env, check=True)

    port = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=plugin_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # a bound against hangs: a loaded machine starts Ray slowly
        while True:  # wait until the head answers
            probe = subprocess.run([RAY, "status", f"--address={address}"], env=plugin_env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read() if head.stdout else ""
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(1)
        proc = stele("run", str(pipeline), "--store", str(cluster), "--address", address,
                     "--no-live", env=plugin_env, check=True)
        assert f"ray: {address}" in proc.stdout and "6 ran" in proc.stdout
        # RAY_ADDRESS works the same way; everything is cached now.
        env = dict(plugin_env, RAY_ADDRESS=address)
        proc = stele("run", str(pipeline), "--store", str(cluster), "--no-live", env=env, check=True)
        assert "all 6 stages cached" in proc.stdout or "6 cached" in proc.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in _session_processes(head.pid):
            os.kill(pid, signal.SIGKILL)

    a, b = ArtifactStore(embedded), ArtifactStore(cluster)
    assert len(a.keys()) == 6 and a.keys() == b.keys()
    assert _contents(a) == _contents(b)
    for key in a.keys():
        assert a.manifest(key)["params"] == b.manifest(key)["params"]
