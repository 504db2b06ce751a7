"""The interruption tests, many times in a row on a loaded machine: a flaky one shows up here.

Runs ``tests/pipeline/test_kill.py`` (Ctrl-C of ``stele run`` then a resuming run; kill -9 at 24
random moments with the store checked after each; kill -9 taking Ray's processes down with the
runner) ``--rounds`` times, each round a fresh pytest process, with ``--busy`` busy-loop processes
beside it the whole time (on a 2-core machine, 2 of them take every core the tests would have had).
Prints each round's outcome and, at the end, the rounds passed, the longest run of passes in a row
and the median round time. A failing round's pytest output is kept under ``--out``.

    python bench/interruption_stress.py [--rounds 20] [--busy 2] [--out /tmp/stress]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/pipeline/test_kill.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the tests")
    ap.add_argument("--out", default="/tmp/stele-interruption-stress")
    ap.add_argument("tests", nargs="*", default=TESTS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    results: list[tuple[bool, float]] = []
    try:
        for i in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   *args.tests], cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            ok = proc.returncode == 0
            results.append((ok, wall))
            last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            print(f"round {i:2d}: {'pass' if ok else 'FAIL'} in {wall:6.1f} s  {last}", flush=True)
            if not ok:
                (out / f"round{i}.txt").write_text(proc.stdout + proc.stderr)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    passed = sum(ok for ok, _ in results)
    streak = best = 0
    for ok, _ in results:
        streak = streak + 1 if ok else 0
        best = max(best, streak)
    print(f"\n{passed}/{len(results)} rounds passed, longest run in a row {best}, "
          f"median round {statistics.median(w for _, w in results):.0f} s, "
          f"{args.busy} busy loops on {os.cpu_count()} cores; tests: {' '.join(args.tests)}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
