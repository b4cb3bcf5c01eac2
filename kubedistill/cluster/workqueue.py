"""Which runs the operator reconciles next, and the loop that reconciles them off kopf's handler threads.

`WorkQueue` has the semantics of client-go's workqueue, on which controller-runtime builds controllers,
for asyncio:

- a run is queued at most once, however many watch events name it before a worker takes it;
- a run being reconciled is handed to no other worker; named again meanwhile, it is queued once more when
  its worker is done, so what the events said is seen then;
- `add_after` wakes a run later (a retry's backoff, a blocked run's next try); the earliest wake wins.

Each entry carries a `Why`: what the reconcile must do besides acting on what changed. A run named for
several reasons before a worker takes it gets the strongest.

`Workers` runs the queue: `workers` coroutines each take a run, read what the reconcile needs from kopf's
in-memory indexes (in the event loop, where kopf writes them), and run the blocking reconcile (storage,
API calls) in a thread pool of the same size. Every `resync` seconds it queues every run FRESH: the safety
net for anything no watch event reported (a manifest deleted by hand), and one sweep, whose duration
is measured.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from prometheus_client import Gauge, Histogram

log = logging.getLogger("kubedistill.cluster.workqueue")

QUEUE_DEPTH = Gauge("kubedistill_operator_queue_depth", "Runs waiting for a reconcile (queued, not yet taken).")
IN_FLIGHT = Gauge("kubedistill_operator_reconciles_in_flight", "Runs being reconciled now.")
SWEEP_SECONDS = Histogram(
    "kubedistill_operator_resync_sweep_seconds",
    "Time from a resync queueing every run until each has been reconciled once.",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf")),
)
LAST_SWEEP = Gauge("kubedistill_operator_resync_last_sweep_seconds", "Duration of the last complete resync sweep.")


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Why(enum.IntEnum):
    """Why a run is reconciled; a stronger reason covers the weaker ones."""

    #: a watch event named it: skipped when nothing the reconcile reads has changed since the last one
    CHANGED = 0
    #: a timer (a retry's backoff ends, a blocked run tries again): reconciled even if nothing changed
    DUE = 1
    #: the resync: reconciled with every manifest and Secret read again
    FRESH = 2


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._pending: dict[K, Why] = {}  # queued, or named again while being reconciled
        self._order: collections.deque[K] = collections.deque()  # pending and not being reconciled
        self._processing: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: K, why: Why = Why.CHANGED) -> None:
        queued = key in self._pending
        self._pending[key] = max(self._pending.get(key, why), why)
        if not queued and key not in self._processing:
            self._order.append(key)
            self._ready.set()
        QUEUE_DEPTH.set(len(self._pending))

    def add_after(self, key: K, delay: float, why: Why = Why.DUE) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        if (old := self._timers.get(key)) is not None:
            if old[0] <= when:
                return  # an earlier wake is already set
            old[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._wake, key, why))

    def _wake(self, key: K, why: Why) -> None:
        self._timers.pop(key, None)
        self.add(key, why)

    def forget(self, key: K) -> None:
        """A run that is gone: its timers are cancelled (a queued entry finds nothing and ends)."""
        if (old := self._timers.pop(key, None)) is not None:
            old[1].cancel()

    async def get(self) -> tuple[K, Why]:
        while not self._order:
            self._ready.clear()
            await self._ready.wait()
        key = self._order.popleft()
        self._processing.add(key)
        IN_FLIGHT.set(len(self._processing))
        why = self._pending.pop(key)
        QUEUE_DEPTH.set(len(self._pending))
        return key, why

    def done(self, key: K) -> None:
        self._processing.discard(key)
        IN_FLIGHT.set(len(self._processing))
        if key in self._pending:  # named again while it was being reconciled
            self._order.append(key)
            self._ready.set()

    def close(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


class Workers(Generic[K, T]):
    """`sync(key, snapshot, why)` for each queued run, `workers` at a time, in threads.

    `take(key)` reads what the reconcile needs (None when the run is gone) in the event loop; `sync` returns
    the seconds after which the run must be reconciled again though nothing changes, or None. A `sync` that
    raises is logged and tried again after `retry` seconds."""

    def __init__(
        self,
        take: Callable[[K], T | None],
        sync: Callable[[K, T | None, Why], float | None],
        keys: Callable[[], Iterable[K]],
        *,
        workers: int,
        resync: float,
        retry: float,
        on_sweep_start: Callable[[], None] = lambda: None,
    ):
        if workers < 1 or resync <= 0 or retry <= 0:
            raise ValueError(f"workers must be >= 1 and resync, retry > 0 (got {workers}, {resync}, {retry})")
        self.queue: WorkQueue[K] = WorkQueue()
        self._take, self._sync, self._keys = take, sync, keys
        self._workers, self._resync, self._retry = workers, resync, retry
        self._on_sweep_start = on_sweep_start
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="reconcile")
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep: set[K] = set()
        self._sweep_started = 0.0
        #: durations of the complete sweeps so far (seconds), newest last
        self.sweeps: list[float] = []

    def add(self, key: K | None, why: Why = Why.CHANGED) -> None:
        if key is not None:
            self.queue.add(key, why)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-{i}") for i in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._resyncs(), name="resync"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.queue.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def _resyncs(self) -> None:
        while True:
            await asyncio.sleep(self._resync)
            self.resync()

    def resync(self) -> None:
        """Queue every run FRESH, as one sweep."""
        if self._sweep:
            log.warning("resync: %d runs of the last sweep are not reconciled yet; starting the next", len(self._sweep))
        self._on_sweep_start()
        self._sweep = set(self._keys())
        self._sweep_started = time.monotonic()
        for key in list(self._sweep):
            self.queue.add(key, Why.FRESH)
        self._sweep_done(None)

    def _sweep_done(self, key: K | None) -> None:
        if key is not None:
            if key not in self._sweep:
                return
            self._sweep.discard(key)
        if not self._sweep and self._sweep_started:
            took = time.monotonic() - self._sweep_started
            self._sweep_started = 0.0
            self.sweeps.append(took)
            del self.sweeps[:-100]
            SWEEP_SECONDS.observe(took)
            LAST_SWEEP.set(took)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key, why = await self.queue.get()
            try:
                snapshot = self._take(key)
                if snapshot is None:
                    self.queue.forget(key)
                again = await loop.run_in_executor(self._pool, self._sync, key, snapshot, why)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling %s failed; trying again in %.0f s", key, self._retry)
                again = self._retry
            finally:
                self.queue.done(key)
            if why == Why.FRESH:
                self._sweep_done(key)
            if again is not None:
                self.queue.add_after(key, again)
