"""Each validation case in a process of its own (CPU validation).

Why: a training job runs one model in its process, and a CPU step's time
depends on the process's heap. glibc's malloc serves a step's activations and
gradients (fresh each step: `zero_grad(set_to_none=True)`) from its heap and
returns the heap's free top to the OS, which the next step faults in again;
where the long-lived blocks sit decides how much, and in one process holding
every case of the suite that is the other cases' history, not the model's own.
On the 2-core VM (2026-11-28) the train step of a model alone in its process,
against the forward step timed beside it, ran 0.5-11% slower than flopsim's
train / forward ratio (median 6.5%, benchmarks/train_vs_forward.py); with four
cases in one process, timed round-robin as the validation did, 6-20% for the
same models (the dropless MoE's 17-20%, alone 5%).

Conventions:
- one worker per case (all its phases): a fresh interpreter
  (`python -m flopsim.case_process FD`: no heap or torch state shared with
  the parent or the other cases, and nothing of the caller's main module
  imported, as multiprocessing's spawn would) with the parent's torch thread
  count, talking over a socket pair (multiprocessing.connection, pickles);
- the parent starts the workers one at a time and each builds its runners and
  profiles them (flopsim.profiling.profile_modules) before the next starts, so
  no two processes run a step at once; afterwards a worker only runs the
  visits it is sent (flopsim.profiling.visit), one at a time, while the others
  wait on their connections;
- a RemoteRunner stands for a worker's runner in flopsim.profiling.time_rounds:
  the parent keeps the drift probe and the round-robin order; the worker
  returns each visit's wall seconds and minor page faults;
- a worker's error comes back as its traceback (RuntimeError in the parent);
  every worker is stopped when the parent is done (`close`).

A GPU's validation keeps its cases in one process: each would hold a CUDA
context of its own, and the caching allocator reuses its blocks.
"""

from __future__ import annotations

import subprocess
import traceback
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RemoteRunner:
    """One (case, phase) whose runner lives in a CaseWorker."""

    spec: object
    phase: str
    context: Optional[int]
    worker: "CaseWorker"
    index: int
    modules: tuple  # what profile_modules returned there
    faults: list = field(default_factory=list)  # minor page faults of each timed run there

    def visit(self, repeats: int) -> list:
        walls, faults = self.worker.ask((self.index, repeats))
        self.faults += faults
        return walls


def _serve(conn, spec, jobs: list, device: str, threads: int) -> None:
    """The worker: build the case's runners, send their profiles, then time visits until told to stop."""
    try:
        import torch

        torch.set_num_threads(threads)
        from flopsim.profiling import make_runner, profile_modules, visit

        runners = [make_runner(spec, phase, batch, seq, context, device=device)
                   for phase, batch, seq, context in jobs]
        conn.send(("ok", [profile_modules(r) for r in runners]))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        return _send_error(conn)
    while True:
        try:
            command = conn.recv()
        except EOFError:  # the parent is gone
            return
        if command is None:
            return
        try:
            index, repeats = command
            walls = visit(runners[index], repeats)
            conn.send(("ok", (walls, runners[index].faults[-repeats:])))
        except BaseException:  # noqa: BLE001
            return _send_error(conn)


def _send_error(conn) -> None:
    try:
        conn.send(("error", traceback.format_exc()))
    except OSError:  # the parent is gone
        pass


class CaseWorker:
    """A process holding one case's runners (see the module docstring)."""

    def __init__(self, name: str, spec, jobs: list, device: str, threads: int):
        import socket
        import sys
        from multiprocessing.connection import Connection

        self.name = name
        mine, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "flopsim.case_process", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send((spec, jobs, device, threads))

    def answer(self):
        """The worker's next answer; its error as a RuntimeError."""
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"validation case {self.name}: its process ended "
                               f"(exit code {self.process.wait()})") from None
        if status == "error":
            raise RuntimeError(f"validation case {self.name} failed in its process:\n{value}")
        return value

    def ask(self, command):
        self.conn.send(command)
        return self.answer()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a stuck worker is killed
                self.process.kill()
                self.process.wait()
        self.conn.close()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def start_cases(cases: list, context_of, device: str, threads: int, tick=None) -> tuple[list, list]:
    """A worker per case, started and profiled one after another. Returns (workers,
    RemoteRunners in the order of the cases' phases); `context_of(phase, case)` gives
    a phase's context. The caller closes the workers (`close_all`)."""
    workers, runners = [], []
    jobs_total = sum(len(case.phases) for case in cases)
    try:
        for case in cases:
            if tick:
                tick(f"profiling {case.name} ({', '.join(case.phases)}) in its own process", len(runners),
                     jobs_total)
            jobs = [(phase, case.batch, case.seq, context_of(phase, case)) for phase in case.phases]
            worker = CaseWorker(case.name, case.spec, jobs, device, threads)
            workers.append(worker)
            profiles = worker.answer()
            for i, (phase, modules) in enumerate(zip(case.phases, profiles)):
                runners.append(RemoteRunner(case.spec, phase, jobs[i][3], worker, i, modules))
    except BaseException:
        close_all(workers)
        raise
    return workers, runners


def close_all(workers: list) -> None:
    for worker in workers:
        worker.close()


def main(fd: int) -> None:
    """A worker's entry point (`python -m flopsim.case_process FD`): the case arrives on
    the connection FD, then `_serve`."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        spec, jobs, device, threads = conn.recv()
    except EOFError:
        return
    _serve(conn, spec, jobs, device, threads)


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]))
