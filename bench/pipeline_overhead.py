"""Engine overhead on a 20-stage DAG of trivial stages, side by side with bare Ray, in one run.

Each stage is a real ``core.snapshot`` of a tiny file; stage i takes stages i-1 and i-2 as inputs.
Every figure is the wall time of a whole command (a fresh Python process each time, as a user types
it), median of ``--repeat`` runs:

* ``ray start-up``    python -c "ray.init(); ray.shutdown()"   (Ray's own cost, the reference)
* ``bare ray dag``    the same 20 copies as 20 chained Ray tasks in a plain script
* ``stele first run`` ``stele run`` on an empty store
* ``stele cached``    ``stele run`` again: everything cached (Ray is not even started)

Goal (issue 2): a fully cached re-run costs at most 2 s beyond Ray's own start-up.

    python bench/pipeline_overhead.py [--stages 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
STELE = str(Path(PY).parent / "stele")
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
ENV.pop("RAY_ADDRESS", None)

RAY_STARTUP = """
import ray
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
ray.shutdown()
"""

BARE_DAG = """
import shutil, sys, ray
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

@ray.remote
def copy(i, *deps):
    shutil.copyfile(src, f"{out}/copy{i}.txt")
    return i

refs = []
for i in range(n):
    refs.append(copy.remote(i, *refs[-2:]))
ray.get(refs)
ray.shutdown()
"""


def pipeline_yaml(n: int, data: Path) -> str:
    lines = ["name: overhead", "stages:"]
    for i in range(n):
        inputs = [f"s{j}" for j in (i - 1, i - 2) if j >= 0]
        lines.append(f"  s{i}:")
        lines.append("    uses: core.snapshot")
        lines.append(f"    with: {{path: {data}, include: ['*.txt', 'n{i}']}}")
        if inputs:
            lines.append(f"    inputs: [{', '.join(inputs)}]")
    return "\n".join(lines) + "\n"


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stele-bench-"))
    data = work / "data"
    data.mkdir()
    (data / "tiny.txt").write_text("stele\n")
    pipeline = work / "overhead.yaml"
    pipeline.write_text(pipeline_yaml(args.stages, data))
    (work / "bare").mkdir()

    times: dict[str, list[float]] = {k: [] for k in
                                     ("ray start-up", "bare ray dag", "stele first run", "stele cached")}
    for r in range(args.repeat):
        times["ray start-up"].append(timed([PY, "-c", RAY_STARTUP], work))
        times["bare ray dag"].append(timed([PY, "-c", BARE_DAG, str(data / "tiny.txt"),
                                            str(work / "bare"), str(args.stages)], work))
        store = work / f"store{r}"
        times["stele first run"].append(timed([STELE, "run", str(pipeline), "--store", str(store),
                                               "--no-live"], work))
        times["stele cached"].append(timed([STELE, "run", str(pipeline), "--store", str(store),
                                            "--no-live"], work))
        print(f"repeat {r + 1}/{args.repeat}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.stages}-stage DAG, median of {args.repeat} (whole commands, fresh processes)")
    for k, v in med.items():
        print(f"  {k:<16} {v:6.2f} s")
    first_overhead = med["stele first run"] - med["bare ray dag"]
    print(f"  stele first run / bare ray dag      = {med['stele first run'] / med['bare ray dag']:.2f}x"
          f"  (+{first_overhead:.2f} s for {args.stages} stages: "
          f"{1000 * first_overhead / args.stages:.0f} ms per stage)")
    print(f"  stele cached / ray start-up          = {med['stele cached'] / med['ray start-up']:.2f}x")
    beyond = med["stele cached"]  # a cached run starts no Ray: all of it is overhead
    print(f"  cached re-run beyond Ray start-up    = {beyond:.2f} s  (goal <= 2 s: "
          f"{'met' if beyond <= 2 else 'NOT met'})")
    print(json.dumps({"stages": args.stages, "repeat": args.repeat, "median_s": med,
                      "cached_rerun_s": beyond}))


if __name__ == "__main__":
    main()
