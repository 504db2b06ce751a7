"""Run ``stele run PIPELINE`` and report its wall time and the peak total RSS of every process it
starts (the runner, Ray's processes and workers: the whole session), sampled every 0.25 s.

    STELE_DATA=/path/to/data python bench/pipeline_rss.py pipelines/wordnet_kge.yaml [stele args]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def session_rss(sid: int) -> int:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss pages
        except (OSError, ValueError, IndexError):
            continue
    return total


def main() -> None:
    stele = str(Path(sys.executable).parent / "stele")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    t = time.perf_counter()
    proc = subprocess.Popen([stele, "run", *sys.argv[1:], "--no-live"], env=env,
                            start_new_session=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, session_rss(proc.pid))
        time.sleep(0.25)
    wall = time.perf_counter() - t
    print(f"exit {proc.returncode}; wall {wall:.1f} s; peak RSS of the whole run "
          f"{peak / 2**30:.2f} GiB")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
