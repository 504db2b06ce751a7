"""A Ray that dies with its runner: the processes of an embedded Ray end when the process that
started it ends, however it ends (``kill -9`` included).

Ray ties most of its processes to the driver, but not all of them: after ``kill -9`` of ``stele
run``, the raylet's ``DashboardAgent`` and ``RuntimeEnvAgent`` notice that the raylet is gone and
then block for ever reporting it to the GCS, which died too. Nothing inside Ray can be relied on
here, so :func:`start` spawns a small watcher in a session of its own (a terminal's Ctrl-C does
not reach it), which blocks on a pipe whose only writer is the runner: when the runner ends, for
whatever reason, the read returns end-of-file and the watcher kills every process of the run until
none is left. It knows them two ways: the runner's descendants, noted at a few moments after Ray
started (:func:`snapshot`; the agents are orphans by the time the runner is gone), and an
environment variable that names the run, set while ``ray.init`` starts Ray's processes (they pass
their environment on to the workers they start later, and those to theirs).

Linux only (it reads ``/proc/<pid>/environ``); elsewhere :func:`start` does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

MARK = "STELE_RAY_OWNER"
_watcher: tuple[int, int] | None = None  # (pid, write end of its pipe): one per process
_token = ""


def token() -> str:
    """This process's mark (``<pid>:<random>``), made on first use."""
    global _token
    if not _token:
        _token = f"{os.getpid()}:{uuid.uuid4().hex}"
    return _token


def start() -> str | None:
    """Start this process's watcher (once) and return the mark that Ray's processes must carry
    in their environment; None where there is no ``/proc`` to find them by."""
    global _watcher
    if not sys.platform.startswith("linux") or not Path("/proc/self/environ").exists():
        return None
    if _watcher is not None:
        try:
            if os.waitpid(_watcher[0], os.WNOHANG) == (0, 0):
                return token()  # still watching
        except ChildProcessError:  # reaped elsewhere: gone
            pass
        os.close(_watcher[1])
    read, write = os.pipe()  # both ends close-on-exec: no other child of ours holds the write end
    env = {k: v for k, v in os.environ.items() if k != MARK}  # the watcher must not match itself
    # posix_spawn rather than subprocess: no Popen object to warn, at exit, that its child still
    # runs (it must). The script needs only the standard library (-I: no site, no user paths).
    pid = os.posix_spawn(sys.executable, [sys.executable, "-I", os.path.abspath(__file__), token()],
                         env, setsid=True, file_actions=[
                             (os.POSIX_SPAWN_DUP2, read, 0),
                             (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                             (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    os.close(read)
    _watcher = (pid, write)
    return token()


def snapshot() -> None:
    """Ask the watcher to note this process's descendants now and in the next seconds (call it
    once Ray has started)."""
    if _watcher is not None:
        try:
            os.write(_watcher[1], b"snapshot\n")
        except OSError:  # the watcher died: nothing to ask
            pass


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None for a gone or zombie one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[19]))


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (st := _stat(int(proc.name))) is not None:
            out[int(proc.name)] = st
    return out


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return out


def marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``STELE_RAY_OWNER=<mark>``. (Not all of Ray's:
    a process that rewrites its title with ``setproctitle`` may overwrite the memory that
    ``/proc/<pid>/environ`` shows, as Ray's agents do; :class:`Watch` finds those by ancestry.)"""
    needle = f"{MARK}={mark}".encode()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                out.append(int(proc.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return out


class Watch:
    """What to kill when the runner ends: the runner's descendants as seen at a few moments of
    its life (remembered with their start times, so that a reused pid is never taken for one of
    them), the marked processes, and every live descendant of either."""

    def __init__(self, runner: int, mark: str):
        self.runner, self.mark = runner, mark
        self.seen: dict[int, int] = {}  # pid -> start time

    def snapshot(self) -> None:
        self.seen.update(descendants(self.runner, _table()))

    def targets(self) -> list[int]:
        table = _table()
        roots = {pid for pid, start in self.seen.items() if table.get(pid, (0, -1))[1] == start}
        roots |= set(marked(self.mark))
        out = set(roots)
        for pid in roots:
            out |= set(descendants(pid, table))
        out.discard(os.getpid())
        return sorted(out)

    def reap(self, settle_s: float = 1.0, limit_s: float = 60.0) -> int:
        """SIGKILL every target until none has been seen for ``settle_s`` (a raylet still alive
        may start another worker meanwhile), or ``limit_s`` passed. Returns the count."""
        killed: set[int] = set()
        quiet_since = time.monotonic()
        deadline = quiet_since + limit_s
        while time.monotonic() < deadline:
            pids = self.targets()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            now = time.monotonic()
            if pids:
                quiet_since = now
            elif now - quiet_since >= settle_s:
                break
            time.sleep(0.05)
        return len(killed)


# Seconds after each "snapshot" request at which the runner's descendants are noted again (Ray
# starts its agents shortly after ``ray.init`` returns), then once a minute.
_SNAPSHOTS = (0.0, 1.0, 3.0, 10.0, 30.0)


def _main(mark: str) -> None:
    import select

    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals: the runner's end decides
        signal.signal(sig, signal.SIG_IGN)
    watch = Watch(os.getppid(), mark)
    due: list[float] = []
    while True:
        timeout = max(0.0, due[0] - time.monotonic()) if due else None
        if select.select([0], [], [], timeout)[0]:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:  # the runner is gone
                break
            now = time.monotonic()
            due = sorted({*due, *(now + s for s in _SNAPSHOTS)})
        elif due:
            watch.snapshot()
            due.pop(0)
            if not due:
                due = [time.monotonic() + 60.0]
    watch.reap()


if __name__ == "__main__":  # pragma: no cover - run as the watcher process (a script: stdlib only)
    _main(sys.argv[1])
