"""Live progress of a running stage: one line in the job log and a small file beside the stage's outputs.

A long loop (training steps, annotated rows, search trials) makes a `Progress` and calls `update(done,
**numbers)` as often as it likes: the update only records. A thread of its own publishes what was recorded
every `every` seconds when it changed, and at least every `heartbeat` seconds when it did not (a step
that takes minutes still says the stage is alive), and once more at `close()`. Publishing is a line

    [student-crsd] progress 120/226 steps (53%) loss 0.4120 · 3.10 steps/s · ETA 34s

in the job log (what `kubectl logs` and the driver log in storage show) and `<stage>/_PROGRESS.json`
(`StageProgress` as JSON) under the run's prefix, which `kubedistill run` prints as one updating line per
stage and the operator copies into the run's `.status` (`kubectl get dr` shows it). A file that cannot be
written is logged and skipped: progress never fails a stage.

Between loops (loading a model, generating samples, exporting) the stage job's own `Heartbeat` reports
`running 2m10s · last: <the stage's latest log line>`, so every running stage reports at least every 30 s.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubedistill.core.spec import StageProgress, to_wire
from kubedistill.core.storage import S3Options, Storage

#: `<run>/<stage>/<PROGRESS_FILE>`: the stage's latest progress (written by whichever attempt runs now)
PROGRESS_FILE = "_PROGRESS.json"
#: what marks a progress line in a job log (the local runner recognises it: `is_progress_line`)
MARK = "progress"
#: a loop publishes every EVERY_S when it changed, at least every HEARTBEAT_S; a stage's own heartbeat beats
#: every BEAT_S while no loop report younger than BEAT_S exists, checking every BEAT_CHECK_S: so every running
#: stage reports at least every 30 s, and a loop's report is never overwritten while the loop runs
EVERY_S = 10.0
HEARTBEAT_S = 15.0
BEAT_S = 25.0
BEAT_CHECK_S = 5.0
#: the unit of a stage's own heartbeat (`Heartbeat`): seconds running, no total
HEARTBEAT_UNIT = "seconds"
_LINE = re.compile(r"\[(?P<stage>[a-z0-9-]+)\] " + MARK + r" ")


def is_progress_line(line: str) -> str | None:
    """What a job-log line reports as progress (after `[stage] progress `; a worker's line has Ray's prefix
    before it), else None."""
    m = _LINE.search(line)
    return line[m.end() :].strip() if m else None


def duration(seconds: float) -> str:
    """`34s`, `1m30s`, `2h05m`: short enough for a status column."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def summarize(
    done: float, total: float | None, unit: str, rate: float | None, eta: float | None, metrics: dict[str, float]
) -> str:
    """The one line a progress report prints (after `[stage] progress `)."""
    count = f"{done:g}/{total:g} {unit} ({100 * done / total:.0f}%)" if total else f"{done:g} {unit}"
    parts = [count + "".join(f" {k} {_number(v)}" for k, v in metrics.items())]
    if rate:
        parts.append(f"{rate:.2f} {unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s per {unit.rstrip('s')}")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return " · ".join(parts)


def short(p: StageProgress) -> str:
    """What a status column shows: `120/226 steps ETA 34s` (a heartbeat: `running 2m10s`)."""
    if p.unit == HEARTBEAT_UNIT:
        return f"running {duration(p.done)}"
    count = f"{p.done:g}/{p.total:g} {p.unit}" if p.total else f"{p.done:g} {p.unit}"
    return count + (f" ETA {duration(p.eta_seconds)}" if p.eta_seconds is not None else "")


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Progress:
    """Progress of one loop of `total` `unit`s (None: unknown), published by a thread of its own.

    `write` takes the report (a `StageProgress` as JSON) and stores it (`storage_sink`); `say` prints the line.
    `start` is the count already done when this process began (a resumed run): the rate counts only what
    this process did."""

    def __init__(
        self,
        stage: str,
        total: float | None,
        unit: str = "steps",
        *,
        label: str | None = None,
        write: Callable[[dict[str, Any]], None] | None = None,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
        every: float = EVERY_S,
        heartbeat: float = HEARTBEAT_S,
        start: float = 0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.stage, self.total, self.unit, self.label = stage, total, unit, label
        self._write, self._say, self._clock, self._wall = write, say, clock, wall
        self.every, self.heartbeat = every, heartbeat
        self._t0, self._start = clock(), start
        self._done, self._metrics = start, dict[str, float]()
        self._changed, self._last = True, float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, done: float, **metrics: float) -> None:
        """Record how far the loop is (cheap: call it every step)."""
        with self._lock:
            self._done = done
            self._metrics.update({k: float(v) for k, v in metrics.items()})
            self._changed = True

    def close(self) -> None:
        """Stop the thread and publish the last state (unless the thread just did)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            unpublished = self._changed
        if unpublished:
            self.publish()

    def report(self) -> StageProgress:
        """The progress as it stands (what `publish` writes)."""
        with self._lock:
            done, metrics = self._done, dict(self._metrics)
        elapsed = self._clock() - self._t0
        rate = (done - self._start) / elapsed if elapsed > 0 and done > self._start else None
        eta = (self.total - done) / rate if rate and self.total is not None else None
        return StageProgress(
            done=done,
            total=self.total,
            unit=self.unit,
            rate=round(rate, 4) if rate else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            metrics=metrics,
            updated_at=_stamp(self._wall()),
            label=self.label,
            summary=(f"{self.label}: " if self.label else "")
            + summarize(done, self.total, self.unit, rate, eta, metrics),
        )

    def publish(self) -> None:
        """Print the line and write the file now."""
        with self._lock:
            self._changed, self._last = False, self._clock()
        p = self.report()
        if self._write is not None:  # the file first: a reader woken by the line finds it current
            try:
                self._write(to_wire(p))
            except Exception as e:  # noqa: BLE001 - progress is a courtesy; it never fails the stage
                self._say(f"[{self.stage}] could not write progress: {type(e).__name__}: {e}")
        self._say(f"[{self.stage}] {MARK} {p.summary}")

    def due(self) -> bool:
        """Whether the thread publishes now: changed and `every` passed, or `heartbeat` passed."""
        since = self._clock() - self._last
        return since >= self.heartbeat or (self._changed and since >= self.every)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every)):
            if self.due():
                self.publish()


@dataclass(frozen=True)
class Target:
    """Where a stage's progress goes, small and picklable: handed to Ray Train workers and Ray tasks, which
    publish it themselves (rank 0 of a training run). S3 credentials are not in it: each process has them in
    its environment, as for every other read and write."""

    root: str  # the run's root: <spec.storage.uri>/<run>
    stage: str
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def of(cls, storage: Storage, stage: str) -> Target:
        return cls(storage.uri(), stage, storage.options.endpoint, storage.options.region)

    def start(self, total: float | None, unit: str = "steps", start: float = 0, **kw: Any) -> Progress:
        """A running `Progress` that writes `<stage>/_PROGRESS.json` (close it when the loop ends)."""
        storage = Storage(self.root, S3Options(self.endpoint, self.region))
        return Progress(self.stage, total, unit, write=storage_sink(storage, self.stage), start=start, **kw).__enter__()


class Steps:
    """A training loop's `on_step(step, total, **numbers)`: the first call starts the `Progress` (the total is
    known then, and a resumed run's first step says where it resumed); only `publish` (rank 0) publishes."""

    def __init__(self, target: Target | None, publish: bool = True, unit: str = "steps", label: str | None = None):
        self.target = target if publish else None
        self.unit, self.label = unit, label
        self.progress: Progress | None = None

    def __call__(self, step: int, total: int, **metrics: float) -> None:
        if self.target is None:
            return
        if self.progress is None:
            self.progress = self.target.start(total, self.unit, start=step - 1, label=self.label)
        self.progress.update(step, **metrics)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class Heartbeat:
    """A stage job's own report while none of its loops reports: every `heartbeat` seconds without a fresh
    progress report from this attempt (its loops publish theirs, from any process: the driver, a Ray Train
    worker, a Ray task), it publishes `running 2m10s · <what the stage said last>`. So every stage says it is
    alive at least every `heartbeat` seconds, also between loops (loading a model, generating samples,
    exporting), and a loop's report is never overwritten while it is fresh."""

    def __init__(
        self,
        storage: Storage,
        stage: str,
        last_said: Callable[[], str | None] = lambda: None,
        *,
        heartbeat: float = BEAT_S,
        check: float = BEAT_CHECK_S,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.storage, self.stage, self._last_said = storage, stage, last_said
        self.heartbeat, self.check, self._say, self._clock, self._wall = heartbeat, check, say, clock, wall
        self._t0, self._started, self._beaten = clock(), _stamp(wall()), float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{stage}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def loop_age(self) -> float | None:
        """Seconds since a loop of this attempt last published (its own clock: a worker's; clocks a few seconds
        apart only shift when the heartbeat takes over), None when none has."""
        last = read(self.storage, self.stage)
        if last is None or last.unit == HEARTBEAT_UNIT or last.updated_at < self._started:
            return None
        return self._wall() - datetime.strptime(last.updated_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()

    def beat(self) -> StageProgress | None:
        """Publish a heartbeat unless one was published less than `heartbeat` seconds ago or a loop's report is
        that fresh; what was published. A fresh loop report counts as a beat: storage is read again only when
        it would have aged out."""
        if self._clock() - self._beaten < self.heartbeat:
            return None
        try:
            if (age := self.loop_age()) is not None and age < self.heartbeat:
                self._beaten = self._clock() - max(0.0, age)
                return None
            running = self._clock() - self._t0
            said = self._last_said()
            summary = f"running {duration(running)}" + (f" · last: {said}" if said else "")
            p = StageProgress(
                done=round(running), unit=HEARTBEAT_UNIT, updated_at=_stamp(self._wall()), summary=summary
            )
            storage_sink(self.storage, self.stage)(to_wire(p))
            self._beaten = self._clock()
        except Exception as e:  # noqa: BLE001 - a heartbeat never fails the stage
            self._say(f"[{self.stage}] could not write progress: {type(e).__name__}: {e}")
            return None
        self._say(f"[{self.stage}] {MARK} {p.summary}")
        return p

    def _run(self) -> None:
        self._beaten = self._clock()  # the first beat after `heartbeat` seconds: a short stage says nothing more
        while not self._stop.wait(self.check):
            self.beat()


def storage_sink(storage: Any, stage: str) -> Callable[[dict[str, Any]], None]:
    """A `write` for `Progress`: `<stage>/_PROGRESS.json` under `storage` (the run's root)."""

    def write(report: dict[str, Any]) -> None:
        storage.write_json(f"{stage}/{PROGRESS_FILE}", report)

    return write


def read(storage: Any, stage: str) -> StageProgress | None:
    """The stage's latest progress file, or None (absent, or not a progress report)."""
    try:
        return StageProgress.model_validate(storage.read_json(f"{stage}/{PROGRESS_FILE}"))
    except (FileNotFoundError, ValueError):
        return None
