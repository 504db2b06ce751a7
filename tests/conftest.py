"""Shared fixtures: offline environment, the test plugin, an in-process Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Offline by default and no Ray token auth, before anything imports Ray or Hugging Face.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s, so each reported step of a tiny test loop
# would take seconds; poll faster in tests (real steps are long, the default is right there).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

PLUGIN_SRC = Path(__file__).parent / "pipeline" / "plugin" / "stele_testplugin.py"
STELE = str(Path(sys.executable).parent / "stele")


def make_plugin_site(root: Path, module_src: Path = PLUGIN_SRC, name: str = "stele_testplugin",
                     entry: str | None = None, group: str = "stele.stages") -> Path:
    """Lay out a separately "installed" distribution whose ``stele.stages`` entry point names
    ``module_src``: exactly what ``pip install some-plugin`` leaves in site-packages."""
    site = root / "site"
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(module_src, site / f"{name}.py")
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {entry or name}\n")
    return site


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_plugin_site(tmp_path_factory.mktemp("plugin"))


@pytest.fixture(scope="session")
def plugin_env(plugin_site: Path) -> dict[str, str]:
    """Environment for a ``stele`` subprocess that has the test plugin installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)
    env.pop("STELE_STORE", None)
    return env


def stele(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 300,
          check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([STELE, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stele {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def test_stages(plugin_site: Path) -> None:
    """Register the test plugin's stage types in this process (Ray workers import it by path)."""
    sys.path.insert(0, str(plugin_site))
    import stele_testplugin  # noqa: F401


@pytest.fixture(scope="session")
def ray_local(test_stages: None):
    from pipeline.ray_utils import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture
def no_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python and fsspec as they are where s3fs is not installed (``pip install -e '.[dev]'``
    installs it): importing s3fs fails, and fsspec has not registered its filesystem yet."""
    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ModuleNotFoundError
    monkeypatch.delitem(_registry, "s3", raising=False)


@pytest.fixture
def memory_uri() -> Iterator[Callable[[Path], str]]:
    """``copy(local file or folder) -> memory://... URI`` of a copy on fsspec's in-memory
    filesystem (what stands in for s3:// in tests: the same fsspec code path, no server); the
    copies are removed at the end of the test."""
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/stele-test-{uuid.uuid4().hex[:12]}"

    def copy(local: Path) -> str:
        local = Path(local)
        dest = f"{base}/{len(fs.ls(base, detail=False)) if fs.exists(base) else 0}/{local.name}"
        if local.is_dir():
            for f in sorted(p for p in local.rglob("*") if p.is_file()):
                fs.pipe_file(f"{dest}/{f.relative_to(local).as_posix()}", f.read_bytes())
        else:
            fs.pipe_file(dest, local.read_bytes())
        return f"memory:/{dest}"

    yield copy
    if fs.exists(base):
        fs.rm(base, recursive=True)


@pytest.fixture
def plan_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    """``plan_error(yaml_text) -> (pipeline file, the one error line)`` of ``stele plan`` on a
    pipeline that must be refused as a bad spec: exit 2, one line, no store created."""
    from pipeline.cli import main

    def run(text: str) -> tuple[Path, str]:
        p = tmp_path / "p.yaml"
        p.write_text(text)
        store = tmp_path / "store"
        code = main(["plan", str(p), "--store", str(store)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, err
        assert not store.exists()
        return p, lines[0]

    return run
