"""math-verify in child processes, with a deadline per call and a time budget per batch.

math-verify's own timeout is `signal.alarm`, which works on the main thread only, and sympy cannot be
interrupted: `9^{9^{9}}` or a deep `\\sqrt{\\sqrt{...}}` computes for minutes. So each call runs in a child
process that is killed when it overruns (the answer counts as wrong), and a batch spreads its calls over a
small pool of such children. A child that cannot start is an error, never a silent "graded wrong".
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class MathVerifyUnavailable(RuntimeError):
    """The math-verify worker process could not start (math-verify missing or broken)."""


@dataclass(frozen=True)
class Check:
    """One question for math-verify. op "strict": verify(parse(gold), parse(pred)); op "r1v": R1-V's
    argument order, verify(parse(pred), parse(gold))."""

    op: str
    gold: str
    pred: str


def default_workers() -> int:
    """Children in the pool: one per core, at most 4 (each holds sympy, ~100 MB)."""
    return max(1, min(4, os.cpu_count() or 1))


class _Worker:
    """One child process answering JSON requests line by line; killed and replaced when it overruns."""

    STARTUP_TIMEOUT_S = 120.0
    CODE = "from gpg_vl.mathverify import serve; serve()"  # what the child runs (tests swap in a broken one)

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._replies: queue.Queue = queue.Queue()
        self._next_id = 0
        self._spawned_at, self._ready, self._dead = 0.0, False, False

    def spawn(self) -> None:
        """Start the child without waiting for it (a replacement warms up while others work)."""
        self.stop()
        self._replies = queue.Queue()
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        # The child sees the parent's import path, so a source checkout works as well as an install.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", self.CODE],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, encoding="utf-8", bufsize=1,
        )
        threading.Thread(target=_pump, args=(self._proc.stdout, self._replies), daemon=True).start()
        self._spawned_at, self._ready, self._dead = time.monotonic(), False, False

    def spawn_if_dead(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self.spawn()

    def wait_ready(self, until: float | None = None) -> bool:
        """Start the child if needed and wait, until the monotonic time `until` at most, for it to answer.

        False when `until` came first; MathVerifyUnavailable when the child exited or stayed silent for
        STARTUP_TIMEOUT_S.
        """
        self.spawn_if_dead()
        if self._ready:
            return True
        limit = self._spawned_at + self.STARTUP_TIMEOUT_S
        if self._reply(min(limit, until if until is not None else limit), "ready") is not None:
            self._ready = True
            return True
        if self._dead or time.monotonic() >= limit:
            raise MathVerifyUnavailable(self._startup_failure())
        return False

    def ask(self, check: Check, timeout_s: float, until: float | None = None) -> bool | None:
        """The child's verdict; False when it overran `timeout_s` (the child is then replaced); None when
        the batch's end `until` came before the child was ready to take the question."""
        if not self.wait_ready(until):
            return None
        if until is not None:
            timeout_s = min(timeout_s, until - time.monotonic())
        self._next_id += 1
        request = {"op": check.op, "gold": check.gold, "pred": check.pred, "id": self._next_id}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:  # the child died between calls: one retry on a fresh one
            self.spawn()
            return self.ask(check, timeout_s, until)
        reply = self._reply(time.monotonic() + timeout_s, self._next_id)
        if reply is None:
            self.spawn()  # hung or died: sympy cannot be interrupted, so the process goes
            return False
        return bool(reply.get("ok"))

    def _reply(self, deadline: float, wanted: int | str) -> dict | None:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = self._replies.get(timeout=remaining)
            except queue.Empty:
                return None
            if reply is None:  # end of the child's stdout: it exited
                self._dead = True
                return None
            if reply.get("id") == wanted:
                return reply
        return None

    def _startup_failure(self) -> str:
        code = None
        if self._proc is not None and self._dead:  # its stdout closed: it is exiting, wait for the code
            try:
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        detail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            detail = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        self.stop()
        if code is not None:
            state = f"exited with code {code}"
        else:
            state = "closed its output" if self._dead else f"sent nothing in {self.STARTUP_TIMEOUT_S:.0f} s"
        return (
            f"the math-verify worker process did not start ({state}); geometry answers cannot be graded. "
            f"Check `{sys.executable} -c 'import math_verify'` (pip install math-verify)."
            + (f"\nworker stderr:\n{detail}" if detail else "")
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class MathVerifyPool:
    """A few math-verify children shared by every thread of one process; started on first use.

    `verify_many` runs a batch on all children at once, each call bounded by `timeout_s` and the whole
    batch by `budget_s`: checks still waiting when the budget runs out are counted wrong, with a warning.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.size = int(workers or default_workers())
        if self.size < 1:
            raise ValueError(f"math-verify pool needs at least one worker, got {workers!r}")
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._free: queue.Queue[_Worker] | None = None
        self._all: list[_Worker] = []

    def _workers(self) -> queue.Queue:
        if self._owner != os.getpid():  # a forked copy (a data-loader worker) must not share the parent's pipes
            self.__init__(self.size)
        with self._lock:
            if self._free is None:
                self._all = [_Worker() for _ in range(self.size)]
                self._free = queue.Queue()
                for worker in self._all:
                    self._free.put(worker)
            return self._free

    def start(self) -> None:
        """Start every child now and wait until all answer (to keep start-up out of a timed section)."""
        free = self._workers()
        workers = [free.get() for _ in range(self.size)]
        try:
            for worker in workers:  # all children import sympy at the same time
                worker.spawn_if_dead()
            for worker in workers:
                worker.wait_ready()
        finally:
            for worker in workers:
                free.put(worker)

    def verify(self, check: Check, timeout_s: float) -> bool:
        """One check, waiting for a free child first (calls from several threads take turns per child)."""
        return bool(self._ask(check, timeout_s, None))

    def _ask(self, check: Check, timeout_s: float, until: float | None) -> bool | None:
        free = self._workers()
        worker = free.get()
        try:
            return worker.ask(check, timeout_s, until)
        finally:
            free.put(worker)

    def verify_many(self, checks: Sequence[Check], timeout_s: float, budget_s: float | None = None) -> list[bool]:
        """Verdicts in order; at most `timeout_s` per check and `budget_s` (if given) for the whole batch."""
        if not checks:
            return []
        deadline = time.monotonic() + budget_s if budget_s is not None else float("inf")
        skipped = []

        def one(index: int) -> bool:
            verdict = None
            if time.monotonic() < deadline:
                verdict = self._ask(checks[index], timeout_s, deadline if budget_s is not None else None)
            if verdict is None:
                skipped.append(index)
            return bool(verdict)

        with ThreadPoolExecutor(max_workers=min(self.size, len(checks))) as pool:
            verdicts = list(pool.map(one, range(len(checks))))
        if skipped:
            warnings.warn(
                f"math-verify: the batch's {budget_s:g} s budget ran out; {len(skipped)} of {len(checks)} answers "
                "were not graded and count as wrong"
            )
        return verdicts

    def stop(self) -> None:
        """Kill every child (at exit, and in tests); the next call starts fresh ones."""
        if self._owner != os.getpid():
            return
        for worker in self._all:
            worker.stop()


def _pump(stream, replies: queue.Queue) -> None:
    """Reader thread: the child's reply lines into a queue, None at end of stream."""
    for line in stream:
        try:
            replies.put(json.loads(line))
        except json.JSONDecodeError:
            continue
    replies.put(None)


_POOL: MathVerifyPool | None = None
_POOL_LOCK = threading.Lock()


def shared_pool() -> MathVerifyPool:
    """The process-wide pool (children start on the first check, not at import)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = MathVerifyPool()
            atexit.register(_POOL.stop)
        return _POOL


def serve() -> None:
    """The child's main loop: JSON requests on stdin, one JSON reply per line on stdout."""
    import logging

    try:
        import resource

        # A runaway sympy integer fails with MemoryError instead of swapping the machine.
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeout is off
    from math_verify import parse, verify

    out, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the reply stream

    @functools.lru_cache(maxsize=2048)  # ground truths repeat; whole r1v outputs (<= 20k chars) rarely do
    def parsed(text: str):
        # Timeouts off: they use signal.alarm; the parent's deadline bounds the call instead.
        return parse(text, parsing_timeout=None)

    def answer(request: dict) -> bool:
        if request["op"] == "r1v":  # R1-V: verify(parse(output), parse(ground_truth)), argument order kept
            return verify(parsed(request["pred"]), parsed(request["gold"]), timeout_seconds=None)
        return verify(parsed(request["gold"]), parsed(request["pred"]), timeout_seconds=None)

    parsed("$1$")  # builds math-verify's grammars before "ready", so the first deadline is not spent on it
    out.write(json.dumps({"id": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok = bool(answer(request))
        except Exception:  # MemoryError and sympy errors are wrong answers
            ok = False
        out.write(json.dumps({"id": request["id"], "ok": ok}) + "\n")
        out.flush()
