"""Process tuning in pipeline.ray_utils: glibc malloc settings for training workers and actors."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
from pipeline.ray_utils import tune_malloc
print(tune_malloc())
"""


def _run(env: dict[str, str]) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_on_glibc_and_can_be_turned_off() -> None:
    """In a fresh process (mallopt changes the whole process): applied where the C library is
    glibc (this project's Linux images), skipped with STELE_MALLOC_TUNING=0."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run({}) == "True"
    assert _run({"STELE_MALLOC_TUNING": "0"}) == "False"


def test_embedded_ray_workers_run_at_normal_priority(ray_local: None) -> None:
    """Ray would start workers at nice 15, below every nice-0 process on the machine: the embedded
    Ray that init_ray starts runs them at the driver's priority."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)


def test_workers_get_the_drivers_extra_path_through_the_environment(ray_local: None,
                                                                    plugin_site) -> None:
    """A directory put on the driver's sys.path (here the test plugin's) reaches the workers
    through the inherited PYTHONPATH, not a job runtime_env (which keeps Ray's idle workers from
    being used); the standard library and site-packages stay out of it."""
    import os
    import sysconfig

    import ray

    entries = os.environ["PYTHONPATH"].split(os.pathsep)
    assert str(plugin_site) in entries
    assert sysconfig.get_paths()["stdlib"] not in entries
    assert sysconfig.get_paths()["purelib"] not in entries
    assert not (ray.get_runtime_context().runtime_env or {}).get("env_vars")

    @ray.remote(num_cpus=0)
    def plugin_file() -> str:
        import stele_testplugin

        return stele_testplugin.__file__

    assert ray.get(plugin_file.remote()).startswith(str(plugin_site))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")
def test_ray_start_timeout_is_retried_after_killing_what_the_failed_attempt_left() -> None:
    """Ray gives a new raylet a fixed 30 s to register, which a loaded machine can miss: the start
    is tried again, and the processes the failed attempt started (they carry the run's mark) are
    killed first. Other errors, and a timeout on the last attempt, are raised as they are."""
    import os

    from pipeline import reaper
    from pipeline.ray_utils import start_with_retries

    mark = f"test-{os.getpid()}"
    left: list[subprocess.Popen] = []

    def failing_start() -> str:
        # what a timed-out ray.init leaves: a process started with the mark in its environment
        left.append(subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                                     env={**os.environ, reaper.MARK: mark}))
        if len(left) < 3:
            raise Exception("The current node timed out during startup. This could happen ...")
        return "started"

    try:
        assert start_with_retries(failing_start, mark, attempts=3) == "started"
        assert [p.wait() for p in left[:2]] == [-9, -9]  # killed before each retry (the reap waits)
        assert left[2].poll() is None                     # the attempt that started is left alone
    finally:
        for p in left:
            p.kill()
            p.wait()

    left.clear()
    with pytest.raises(Exception, match="timed out during startup"):
        start_with_retries(failing_start, mark, attempts=2)  # both attempts time out
    for p in left:
        p.kill()
        p.wait()

    def other() -> None:
        raise ValueError("a bad argument")

    with pytest.raises(ValueError):
        start_with_retries(other, mark)
