"""Reward sandbox: every reward-function call runs under a wall-clock limit, in a worker the trainer can give up on.

Why: math-verify's own timeouts use ``signal.alarm``, which works only in the main thread of the main
interpreter (elsewhere every call fails and scores 0), and one hung verifier call freezes a whole
multi-GPU job. ``tasks/rewards.py`` turns those signal timeouts off; this module puts a limit that
needs no signals around every call, from any thread and in every process.

How one TRL reward call (one function, this process's completions) runs:

1. The whole batch goes to the worker as one call, with a deadline of ``timeout`` seconds.
2. If that call raises or misses its deadline, every completion is scored on its own, each call with the
   same deadline, so a bad sample costs only its own reward: a sample whose call raises or times out
   gets ``None`` (TRL turns it into NaN; a group in which no sample has a reward gets advantage 0) and
   is counted in ``reward/errors`` or ``reward/timeouts``. Values that are not finite (inf, NaN) count as
   errors too. The one-by-one pass runs on ``RETRY_WORKERS`` workers side by side and has a budget of
   ``RETRY_BUDGET * timeout`` seconds in all; completions it does not reach count as timeouts. So a
   hung group of samples costs about ``2 * timeout`` of wall time, and a function that hangs on
   everything at most ``(1 + RETRY_BUDGET) * timeout`` per call, instead of freezing the run.
3. Results go through the one check of the reward contract (``reward_contract.py``): breaking it (a
   wrong number of values, a value that is not a number or None) is a bug in the function, not a bad
   sample, and :class:`RewardContractError` is raised.

Modes (``reward_sandbox``), and the trade-off between them:

- ``process`` (default): the function runs in a worker process started from a fork server (a clean,
  single-threaded process that has imported the reward modules once; workers are forked from it in
  milliseconds). A call past its deadline ends with the worker being killed (SIGKILL); the next call
  gets a fresh worker. Nothing a reward function does can stall the trainer: not a Python loop, not C
  code holding the GIL, not a crash of the interpreter. The price: arguments and results are pickled,
  so the function must be importable (a registry name or ``pkg.module:function``; a lambda, closure or a
  function of ``__main__`` falls back to ``thread`` with a warning), and the worker sees a copy of
  ``trainer_state``.
- ``thread``: the function runs in a worker thread of the trainer process. Nothing is pickled and any
  callable works, but a thread cannot be killed: a call past its deadline is *abandoned* and keeps
  running, holding its CPU (and any memory it grows), until it returns on its own; a call stuck in C
  code that holds the GIL (a huge integer power, a regex catastrophe) stalls the whole trainer and
  cannot be timed out at all.
- ``none``: a direct call, no limit; an exception in a reward function stops the run. Its results are
  checked all the same (``reward_contract.CheckedReward``).

In both sandboxed modes ``log_metric``/``log_extra`` calls made by the function are recorded in the
worker and replayed in the trainer after the call returns (an abandoned call never logs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from rlvr_entropy.reward_contract import (
    CheckedReward,
    RewardContractError,
    RewardStats,
    check_output,
    drop_nonfinite,
    function_name,
)

logger = logging.getLogger(__name__)

MODES = ("process", "thread", "none")
RETRY_BUDGET = 4  # the one-by-one pass after a failed batch call may take this many reward_timeouts in all
RETRY_WORKERS = 4  # workers that score completions side by side in the one-by-one pass
STARTUP_TIMEOUT = 120.0  # seconds a new worker process may take to start (not counted in any call's deadline)
# Keyword arguments TRL passes that are callbacks into the trainer: recorded in the worker, replayed here.
_LOG_CALLBACKS = ("log_metric", "log_extra")


class CallTimeout(Exception):
    """A reward call missed its deadline (the worker was killed or abandoned)."""


class WorkerStartError(Exception):
    """A worker process could not start (e.g. the function's module cannot be imported there)."""


class CallFailed(Exception):
    """A reward call raised in the worker; ``remote`` is the exception (or its repr), ``trace`` its traceback."""

    def __init__(self, remote: BaseException, trace: str) -> None:
        super().__init__(f"{type(remote).__name__}: {remote}")
        self.remote = remote
        self.trace = trace


# ----------------------------------------------------------------------------------------------------------
# What runs inside a worker (thread or process)


def _run_call(func: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Any, list[tuple[str, Any, Any]]]:
    """Call ``func`` with recording stand-ins for the trainer's logging callbacks."""
    records: list[tuple[str, Any, Any]] = []
    for name in _LOG_CALLBACKS:
        if name in kwargs:
            kwargs[name] = (lambda n: lambda key, value: records.append((n, key, value)))(name)
    return func(**kwargs), records


def _failure(err: BaseException) -> tuple[str, Any, str]:
    trace = traceback.format_exc()
    try:
        pickle.dumps(err)
        remote: Any = err
    except Exception:
        remote = RuntimeError(f"{type(err).__name__}: {err}")
    return ("error", remote, trace)


def _process_main(conn: Any, func: Callable[..., Any]) -> None:
    """Worker process: answer calls until the pipe closes; exit if the trainer process disappears."""
    parent = os.getppid()

    def watchdog() -> None:  # forkserver children are reparented when the fork server (and trainer) die
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    conn.send(("ready",))
    while True:
        try:
            kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            out, records = _run_call(func, kwargs)
            message: tuple = ("ok", out, records)
        except BaseException as err:  # noqa: BLE001 - everything is reported to the trainer
            message = _failure(err)
        try:
            conn.send(message)
        except Exception as err:  # the result itself does not pickle: report that instead
            conn.send(("error", RuntimeError(f"reward result could not be sent back: {err}"), ""))


# ----------------------------------------------------------------------------------------------------------
# Workers, seen from the trainer


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without re-running the trainer's main script in it.

    multiprocessing (spawn and forkserver) re-imports the parent's ``__main__`` in every child: a training
    script without an ``if __name__ == "__main__":`` guard would start training again inside the reward
    worker. The worker needs nothing from ``__main__`` (functions defined there run in a thread), so the
    main module's file and spec are hidden while the child's start-up data is taken.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _ProcessWorker:
    """One worker process; killed when a call misses its deadline, restarted on the next call."""

    _preloaded = False

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.proc: Any = None
        self.conn: Any = None

    def _start(self) -> None:
        try:
            ctx = multiprocessing.get_context("forkserver")
        except ValueError as err:  # no fork server on this platform (Windows)
            raise WorkerStartError(str(err)) from None
        if not _ProcessWorker._preloaded:
            # Effective only before the fork server starts (once per trainer process): workers are then
            # forked with this package and the reward function's module already imported.
            modules = ["rlvr_entropy.sandbox", type(self.func).__module__, getattr(self.func, "__module__", None)]
            ctx.set_forkserver_preload([m for m in dict.fromkeys(modules) if m and m not in ("__main__", "builtins")])
            _ProcessWorker._preloaded = True
        parent_conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_process_main, args=(child_conn, self.func), daemon=True, name="reward-sandbox")
        with _main_module_hidden():
            self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        try:
            ready = parent_conn.poll(STARTUP_TIMEOUT) and parent_conn.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise WorkerStartError("the worker process did not start (see its error above)")

    def call(self, kwargs: dict[str, Any], timeout: float) -> tuple[Any, list]:
        if self.proc is None or not self.proc.is_alive():
            self.close()
            self._start()
        self.conn.send(kwargs)
        if not self.conn.poll(timeout):
            self.close()
            raise CallTimeout()
        try:
            status, *payload = self.conn.recv()
        except (EOFError, OSError) as err:  # the worker died mid-call (crash, OOM kill, os._exit)
            self.close()
            raise CallFailed(RuntimeError(f"the reward worker process died during the call ({err!r})"), "") from None
        if status == "error":
            raise CallFailed(payload[0], payload[1])
        return payload[0], payload[1]

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5)
            self.proc = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _ThreadWorker:
    """One worker thread; abandoned (left to finish on its own) when a call misses its deadline."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.inbox: queue.Queue | None = None
        self.outbox: queue.Queue | None = None

    def _start(self) -> None:
        inbox, outbox = queue.Queue(), queue.Queue()

        def loop() -> None:
            while True:
                kwargs = inbox.get()
                if kwargs is None:
                    return
                try:
                    outbox.put(("ok", *_run_call(self.func, kwargs)))
                except BaseException as err:  # noqa: BLE001
                    outbox.put(("error", err, traceback.format_exc()))

        threading.Thread(target=loop, daemon=True, name="reward-sandbox").start()
        self.inbox, self.outbox = inbox, outbox

    def call(self, kwargs: dict[str, Any], timeout: float) -> tuple[Any, list]:
        if self.inbox is None:
            self._start()
        assert self.inbox is not None and self.outbox is not None
        self.inbox.put(kwargs)
        try:
            status, *payload = self.outbox.get(timeout=timeout)
        except queue.Empty:
            self.close()  # the hung call keeps its thread; the thread exits once the call returns
            raise CallTimeout() from None
        if status == "error":
            raise CallFailed(payload[0], payload[1])
        return payload[0], payload[1]

    def close(self) -> None:
        if self.inbox is not None:
            self.inbox.put(None)
        self.inbox = self.outbox = None


# ----------------------------------------------------------------------------------------------------------
# The wrapper TRL calls


def picklable(func: Callable[..., Any]) -> str | None:
    """None if ``func`` can run in a worker process, else why not."""
    if getattr(func, "__module__", None) == "__main__":
        return "it is defined in __main__ (a worker process cannot import it)"
    try:
        pickle.dumps(func)
    except Exception as err:  # noqa: BLE001
        return f"it cannot be pickled ({type(err).__name__}: {err})"
    return None


class SandboxedReward:
    """A reward function run under a deadline, batch first, then per sample when the batch call fails.

    Called by TRL exactly like the function it wraps (keyword arguments, one value per completion).
    """

    def __init__(self, func: Callable[..., Any], timeout: float, mode: str = "process",
                 stats: RewardStats | None = None, name: str | None = None) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"reward sandbox mode must be 'process' or 'thread', got {mode!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"reward_timeout must be a positive number of seconds, got {timeout!r}")
        self.func = func
        self.__name__ = name or function_name(func)
        self.timeout = float(timeout)
        self.stats = stats if stats is not None else RewardStats()
        if mode == "process":
            why = picklable(func)
            if why is not None:
                logger.warning("reward function '%s' runs in a worker thread, not a process: %s. A call past "
                               "reward_timeout is abandoned, not stopped.", self.__name__, why)
                mode = "thread"
        self.mode = mode
        self._lock = threading.Lock()
        self._workers: list[_ProcessWorker | _ThreadWorker] = [self._new_worker()]  # [0] takes batch calls
        self._reported_error = False

    def __repr__(self) -> str:
        return f"SandboxedReward({self.__name__}, mode={self.mode}, timeout={self.timeout:g}s)"

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        del self._workers[1:]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- calling --------------------------------------------------------------------------------------------
    def _new_worker(self) -> _ProcessWorker | _ThreadWorker:
        return _ProcessWorker(self.func) if self.mode == "process" else _ThreadWorker(self.func)

    def _send(self, kwargs: dict[str, Any], worker: _ProcessWorker | _ThreadWorker | None = None,
              timeout: float | None = None) -> tuple[Any, list]:
        """One call in ``worker`` (the main one by default); a function that cannot run in a worker process
        (its arguments do not pickle, its module does not import there) moves to a thread for good."""
        worker = worker or self._workers[0]
        timeout = self.timeout if timeout is None else timeout
        try:
            return worker.call(kwargs, timeout)
        except (pickle.PicklingError, TypeError, AttributeError, WorkerStartError) as err:
            if not isinstance(worker, _ProcessWorker):
                raise
            with self._lock:
                main = worker is self._workers[0]
                if self.mode == "process":
                    logger.warning("reward function '%s' cannot run in a worker process (%s); it runs in a worker "
                                   "thread from now on, where a call past reward_timeout is abandoned, not stopped",
                                   self.__name__, err)
                    for w in self._workers[1:]:
                        w.close()
                    worker.close()
                    self.mode = "thread"
                    self._workers = [_ThreadWorker(self.func)]
            return (self._workers[0] if main else _ThreadWorker(self.func)).call(kwargs, timeout)

    def __call__(self, **kwargs: Any) -> list[float | None]:
        prompts = kwargs.get("prompts") or []
        n = len(prompts)
        callbacks = {name: kwargs.pop(name) for name in _LOG_CALLBACKS if name in kwargs}
        call_kwargs = {**kwargs, **{name: None for name in callbacks}}  # placeholders, replaced in the worker
        state = call_kwargs.get("trainer_state")
        if self.mode == "process" and dataclasses.is_dataclass(state) and getattr(state, "log_history", None):
            call_kwargs["trainer_state"] = dataclasses.replace(state, log_history=[])  # do not ship the history
        if self.mode == "process" and call_kwargs.get("environments") is not None:
            logger.warning("reward function '%s' reads environments, which cannot be sent to a worker process; it "
                           "runs in a worker thread from now on", self.__name__)
            self.close()
            self.mode, self._workers = "thread", [_ThreadWorker(self.func)]
        try:
            out, records = self._send(dict(call_kwargs))
        except (CallTimeout, CallFailed) as err:
            if isinstance(err, CallFailed) and isinstance(err.remote, RewardContractError):
                raise err.remote from None
            if n <= 1:  # the batch was one sample: no need to call it again
                return self._account([None] * n, *((0, n) if isinstance(err, CallTimeout) else (n, 0)),
                                     err if isinstance(err, CallFailed) else None, n)
            logger.warning("reward function '%s': the batch call %s; scoring its %d completions one by one",
                           self.__name__, "timed out" if isinstance(err, CallTimeout) else f"raised {err}", n)
            return self._per_sample(call_kwargs, n, callbacks)
        values = check_output(out, n, self.__name__)
        self._replay(records, callbacks)
        return drop_nonfinite(values, self.__name__, self.stats)

    def _per_sample(self, kwargs: dict[str, Any], n: int, callbacks: dict[str, Callable]) -> list[float | None]:
        """Score each completion on its own, on up to RETRY_WORKERS workers at once, within the retry budget.

        Hangs usually come in groups (the G completions of one prompt share its reference answer), so the
        workers run side by side: a hung group costs one deadline, not G of them.
        """
        # ("ok", (value, records)) | ("error", CallFailed) | ("timeout",); None: not reached within the budget
        results: list[tuple[str, Any] | None] = [None] * n
        budget_end = time.monotonic() + RETRY_BUDGET * self.timeout
        next_index = iter(range(n))
        while len(self._workers) < min(RETRY_WORKERS, n):
            self._workers.append(self._new_worker())

        def drive(worker: _ProcessWorker | _ThreadWorker) -> None:
            while True:
                with self._lock:
                    i = next(next_index, None)
                if i is None:
                    return
                remaining = budget_end - time.monotonic()
                if remaining <= 0:
                    continue  # the budget is spent: left unscored (counted as a timeout)
                one = {k: [v[i]] if isinstance(v, list | tuple) and len(v) == n else v for k, v in kwargs.items()}
                try:
                    results[i] = ("ok", self._send(one, worker, min(self.timeout, remaining)))
                except CallTimeout:
                    results[i] = ("timeout",)
                except CallFailed as err:
                    results[i] = ("error", err)

        workers = self._workers[: min(RETRY_WORKERS, n)]
        drivers = [threading.Thread(target=drive, args=(w,), daemon=True) for w in workers]
        for d in drivers:
            d.start()
        for d in drivers:
            d.join()
        for worker in self._workers[1:]:  # keep one worker between batches
            worker.close()
        del self._workers[1:]

        values: list[float | None] = []
        extra: dict[str, list] = {}
        errors = timeouts = unreached = 0
        first_error: CallFailed | None = None
        for i, result in enumerate(results):
            if result is None or result[0] == "timeout":
                unreached += result is None
                timeouts += 1
                values.append(None)
                continue
            if result[0] == "error":
                if isinstance(result[1].remote, RewardContractError):
                    raise result[1].remote from None
                errors += 1
                first_error = first_error or result[1]
                values.append(None)
                continue
            out, records = result[1]
            values.append(check_output(out, 1, self.__name__)[0])
            for kind, key, value in records:
                if kind == "log_extra":
                    column = extra.setdefault(key, [None] * n)
                    if isinstance(value, list | tuple) and len(value) == 1:
                        column[i] = value[0]
                elif "log_metric" in callbacks:
                    callbacks["log_metric"](key, value)
        if "log_extra" in callbacks:
            for key, column in extra.items():
                callbacks["log_extra"](key, column)
        if unreached:
            logger.warning("reward function '%s': the one-by-one pass ran out of its budget (%g s): %d of %d "
                           "completions were not scored", self.__name__, RETRY_BUDGET * self.timeout, unreached, n)
        return self._account(values, errors, timeouts, first_error, n)

    def _account(self, values: list[float | None], errors: int, timeouts: int, first_error: CallFailed | None,
                 n: int) -> list[float | None]:
        self.stats.errors += errors
        self.stats.timeouts += timeouts
        if errors or timeouts:
            message = (f"reward function '{self.__name__}': {errors + timeouts} of {n} completions got no reward "
                       f"({errors} raised, {timeouts} timed out after {self.timeout:g}s)")
            if first_error is not None and (not self._reported_error or errors == n):
                self._reported_error = True
                message += f"; first error: {first_error}\n{first_error.trace}"
            logger.warning(message)
        return drop_nonfinite(values, self.__name__, self.stats)

    @staticmethod
    def _replay(records: list, callbacks: dict[str, Callable]) -> None:
        for kind, key, value in records:
            if kind in callbacks:
                callbacks[kind](key, value)


def sandboxed(func: Callable[..., Any], timeout: float | None, mode: str, stats: RewardStats) -> Callable[..., Any]:
    """``func`` under the sandbox; a direct but checked call for mode ``none`` or no timeout; async functions
    as they are (TRL awaits them on its own event loop and checks their results)."""
    import inspect

    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
        return func
    if mode == "none" or timeout is None:
        return CheckedReward(func, stats)
    return SandboxedReward(func, timeout, mode, stats)
