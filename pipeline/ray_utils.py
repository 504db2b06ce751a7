"""Ray start-up with the process settings that local training and feature workers need (worker
niceness, Ray Train's polling, glibc's malloc thresholds), shared by the CLI and stages."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

# Defaults that must be in the environment before Ray starts its processes.
_LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",       # Ray 2.60 turns on token auth for local clusters
    "RAY_USAGE_STATS_ENABLED": "0",    # no phone-home attempts on a machine without internet
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train's controller polls workers every 2 s by default; each checkpoint report waits for a
    # poll, which costs seconds per checkpoint in short local runs.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Spot-instance preemption does not happen to a local Ray; its watcher only costs start-up.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray starts workers at nice 15 to keep a driver responsive; in stele the workers are the job
    # (training, featurizing) and at nice 15 every nice-0 process (Ray's own daemons, the stage
    # driver writing shards) preempts them: epochs get slower and drift within a run (BENCHMARKS.md,
    # "Process settings of stele's Ray workers"). Ray's job API runs drivers at nice 0 for the same
    # reason.
    "RAY_worker_niceness": "0",
}


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep glibc from handing every multi-megabyte buffer back to the OS, in a process that
    allocates the same large tensors step after step (a training worker, a featurizer actor).

    glibc serves an allocation above a dynamic threshold (128 KB at start) with ``mmap`` and frees
    it with ``munmap``, and trims the heap's free top, so torch's CPU tensors of a few MB are
    page-faulted in afresh at every step (a profile puts most of the cost in the fresh outputs of
    gathers such as ``index_select``; timings: BENCHMARKS.md, "Process settings of stele's Ray
    workers"). This sets the mmap threshold to 32 MB (glibc's maximum) and the trim threshold to
    256 MB: up to that much freed memory stays with the process. ``STELE_MALLOC_TUNING=0`` turns it
    off; a no-op (False) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    if os.environ.get("STELE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def local_num_cpus() -> int:
    """Logical CPUs for an embedded Ray: oversubscribed (at least 4) because Ray Data feeding a
    2-worker TorchTrainer deadlocks at num_cpus=2 on a 2-core machine; ``STELE_RAY_NUM_CPUS``
    overrides."""
    env = os.environ.get("STELE_RAY_NUM_CPUS")
    return int(env) if env else max(4, os.cpu_count() or 1)


def _extra_sys_path() -> list[str]:
    """The driver's ``sys.path`` entries that a fresh interpreter would not have (the standard
    library and site-packages left out, so that a subprocess of another Python is not handed
    this one's packages)."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    standard = {os.path.realpath(p) for p in (*(paths.get(k) for k in ("stdlib", "platstdlib",
                                                                        "purelib", "platlib")),
                                               *site.getsitepackages()) if p}
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p) or p in out:
            continue
        real = os.path.realpath(p)
        if real in standard or (os.path.dirname(real) in standard and real.endswith("lib-dynload")):
            continue
        out.append(p)
    return out


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> dict:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start an embedded local Ray.

    Returns ``{"address": ..., "embedded": bool, "resources": {...}}``.
    """
    import ray

    for k, v in _LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        # Stage logs go to each artifact's log.txt; the console shows the live status instead.
        common = dict(log_to_driver=False, logging_level=logging.WARNING)
        if address:  # a running cluster owns its resources and dashboard
            ray.init(address=address, **{**common, **kwargs})
        else:
            # Workers of an embedded Ray import what the driver can import (plugins on the driver's
            # sys.path included); on a cluster, code must be installed on the nodes. Through the
            # environment Ray's processes inherit, not a runtime_env: workers of a job with its own
            # runtime_env cannot use the idle workers Ray starts with the cluster, so each actor
            # waited for a fresh process while those sat idle.
            os.environ["PYTHONPATH"] = os.pathsep.join(_extra_sys_path())
            n = num_cpus or local_num_cpus()
            # Stage tasks that drive Ray Train hold no CPU, so more workers start at once than
            # Ray's default startup concurrency (the physical cores) expects; it would print a
            # warning about it on the console for every run.
            os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(n))
            # address="local": always a private instance, never silently joining another
            # process's Ray that happens to run on this machine.
            kwargs.setdefault("include_dashboard", False)
            if not kwargs["include_dashboard"]:
                # Without a dashboard there is no State API; pipeline.train reads this to skip
                # Ray Train's placement-group cleaner, whose every query would time out (10 s).
                os.environ["STELE_RAY_STATE_API"] = "0"
            # Every process of this Ray carries the runner's mark, so that the reaper ends them
            # with the runner, kill -9 included; set only while Ray starts them, so that what the
            # driver starts later is not marked.
            from . import reaper

            mark = reaper.start()
            if mark:
                os.environ[reaper.MARK] = mark
            try:
                start_with_retries(lambda: ray.init(address="local", num_cpus=n, **{**common, **kwargs}),
                                   mark)
            finally:
                os.environ.pop(reaper.MARK, None)
            reaper.snapshot()
    ctx = ray.get_runtime_context()
    return {"address": address or "embedded", "embedded": not address,
            "resources": ray.cluster_resources(), "node": ctx.get_node_id()}


# Ray waits a fixed 30 s for a new raylet to register with its GCS (ray._private.node); on a
# machine loaded by other work that can pass while nothing is wrong, and the run would fail.
_STARTUP_TIMEOUT = "timed out during startup"
STARTUP_ATTEMPTS = 3


def start_with_retries(start: Callable[[], Any], mark: str | None, attempts: int = STARTUP_ATTEMPTS) -> Any:
    """``start()`` (an embedded ``ray.init``), again after Ray's start-up timeout, up to ``attempts``
    times in all. Before each retry the processes the failed attempt left running (those carrying
    the reaper's ``mark``, and their descendants) are killed, so attempts do not pile up raylets on
    a machine that is already short of CPU (an agent whose raylet has already died is nobody's
    descendant and may carry no readable mark: it is not found, here as at the reaper's exit). Any
    other error, or the last timeout, is raised."""
    for attempt in range(1, attempts):
        try:
            return start()
        except Exception as e:  # Ray raises a bare Exception for this
            if _STARTUP_TIMEOUT not in str(e):
                raise
            print(f"stele: Ray did not start in time (attempt {attempt} of {attempts}; the machine "
                  f"may be busy): starting it again", file=sys.stderr)
            if mark:
                from . import reaper

                reaper.Watch(os.getpid(), mark).reap(settle_s=0.5)
    return start()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
