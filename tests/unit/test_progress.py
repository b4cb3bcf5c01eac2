"""Live progress (`kubedistill.core.progress`) and kept driver logs (`kubedistill.core.driverlog`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from kubedistill.core import driverlog, progress
from kubedistill.core.spec import StageProgress
from kubedistill.core.storage import Storage


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _progress(lines: list[str], written: list[dict], clock: Clock, **kw) -> progress.Progress:
    return progress.Progress("student-crsd", 100, "steps", write=written.append, say=lines.append, clock=clock,
                             wall=lambda: 1_764_288_000.0, **kw)


def test_a_report_has_the_rate_and_the_time_left_computed_by_hand():
    lines, written, clock = [], [], Clock()
    p = _progress(lines, written, clock)
    clock.t += 10  # 20 steps in 10 s: 2 steps/s, 80 left: 40 s
    p.update(20, loss=0.41234)
    p.publish()
    (report,) = written
    assert report == {"done": 20, "total": 100, "unit": "steps", "rate": 2.0, "etaSeconds": 40.0,
                      "metrics": {"loss": 0.41234}, "updatedAt": "2025-11-28T00:00:00Z", "label": None,
                      "summary": "20/100 steps (20%) loss 0.4123 · 2.00 steps/s · ETA 40s"}
    assert lines == ["[student-crsd] progress 20/100 steps (20%) loss 0.4123 · 2.00 steps/s · ETA 40s"]
    assert StageProgress.model_validate(report).summary == report["summary"]


def test_a_resumed_loop_counts_only_what_this_process_did():
    lines, written, clock = [], [], Clock()
    p = _progress(lines, written, clock, start=60)  # resumed at step 60
    clock.t += 20
    p.update(70)  # 10 steps in 20 s: 0.5/s, 30 left: 60 s
    assert (p.report().rate, p.report().eta_seconds) == (0.5, 60.0)
    assert p.report().summary == "70/100 steps (70%) · 0.50 steps/s · ETA 1m00s"


def test_published_when_changed_every_few_seconds_and_at_least_every_heartbeat():
    lines, written, clock = [], [], Clock()
    p = _progress(lines, written, clock, every=10, heartbeat=30)
    assert p.due()  # never published
    p.publish()
    p.update(1)
    clock.t += 9
    assert not p.due()  # changed, but 10 s have not passed
    clock.t += 1
    assert p.due()
    p.publish()
    clock.t += 29
    assert not p.due()  # nothing changed: only the heartbeat
    clock.t += 1
    assert p.due()


def test_the_thread_publishes_while_the_loop_is_stuck_in_one_long_step():
    published = threading.Event()
    p = progress.Progress("annotate", 10, "rows", say=lambda line: published.set(), every=0.05, heartbeat=0.05)
    with p:
        p.update(3)
        assert published.wait(30), "the progress thread never published"  # the caller never called publish


def test_a_failed_write_is_said_and_never_fails_the_loop():
    lines = []

    def broken(report):
        raise OSError("bucket gone")

    clock = Clock()
    p = progress.Progress("data", 2, "files", write=broken, say=lines.append, clock=clock)
    clock.t += 20  # a slow file: under 0.1 per second, the line says seconds per file
    p.update(1)
    p.publish()
    assert lines == ["[data] could not write progress: OSError: bucket gone",
                     "[data] progress 1/2 files (50%) · 20.0 s per file · ETA 20s"]


@pytest.mark.parametrize(("line", "summary"), [
    ("[student-crsd] progress 12/40 steps (30%)", "12/40 steps (30%)"),
    ("\x1b[36m(RayTrainWorker pid=17507)\x1b[0m [teacher-sft] progress ce student: 1/2 steps", "ce student: 1/2 steps"),
    ("[student-crsd] step 12/12 val macro-F1 0.16", None),
    ("progress 1/2", None),
])
def test_a_progress_line_is_recognised_with_or_without_rays_worker_prefix(line, summary):
    assert progress.is_progress_line(line) == summary


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (90, "1m30s"), (3600, "1h00m"), (7380, "2h03m")])
def test_durations_are_short(seconds, text):
    assert progress.duration(seconds) == text


def test_steps_publish_from_rank_0_only_and_start_where_the_loop_resumed(tmp_path):
    target = progress.Target(str(tmp_path / "run"), "teacher-sft")
    other = progress.Steps(target, publish=False)
    other(5, 10, loss=1.0)
    assert other.progress is None and not (tmp_path / "run").exists()
    steps = progress.Steps(target, publish=True, label="sft")
    steps(5, 10, loss=1.0)  # a resumed run's first step is 5: 4 were done before
    assert steps.progress is not None and steps.progress._start == 4
    steps.close()
    report = progress.read(Storage(str(tmp_path / "run")), "teacher-sft")
    assert report is not None and (report.done, report.total, report.label) == (5, 10, "sft")
    assert report.summary.startswith("sft: 5/10 steps (50%) loss 1.0000")
    assert progress.read(Storage(str(tmp_path / "run")), "no-such-stage") is None


def test_the_driver_log_has_what_the_process_and_its_children_wrote_and_the_job_log_still_gets_it(tmp_path):
    """`captured` in a process of its own (it redirects fds 1 and 2): a print, a write to fd 2 and a child
    process's output all land in the captured file, and in the process's real stdout as well."""
    code = (
        "import os, subprocess, sys\n"
        "from kubedistill.core import driverlog\n"
        "with driverlog.captured() as log:\n"
        "    print('from python', flush=True)\n"
        "    os.write(2, b'from fd 2\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"from a child\")'], check=True)\n"
        "sys.stdout.write('CAPTURED:' + log.read_text().replace(chr(10), '|') + chr(10))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert {"from python", "from fd 2", "from a child"} <= set(lines)  # the job log (stderr goes there too)
    captured = next(x for x in lines if x.startswith("CAPTURED:"))
    assert all(s in captured for s in ("from python|", "from fd 2|", "from a child|"))


def test_kept_logs_are_named_by_time_and_only_the_newest_are_kept(tmp_path):
    store = Storage(str(tmp_path / "run"))
    src = tmp_path / "driver.log"
    src.write_text("a line\n")
    names = [f"2026120{i}T000000Z-0000000{i}.log" for i in range(1, 5)]
    for name in names:
        driverlog.keep(store, "data", src, name, keep_logs=3)
    assert driverlog.stage_logs(store, "data") == names[::-1][:3]  # newest first; the oldest deleted
    assert store.read_text(f"data/logs/{names[-1]}") == "a line\n"
    assert driverlog.log_name().endswith(".log") and driverlog.log_name() != driverlog.log_name()


def loud_failure(ctx):
    """A stage function for the job tests below: says something, then fails."""
    print("about to fail", flush=True)
    os.write(2, b"a C library complains\n")
    raise ValueError("spec.data.logs: nothing there")


def held(ctx):
    """A stage function that waits at a hold point until the test stops it."""
    from kubedistill.core.holds import hold

    print("working", flush=True)
    hold("test.held")
    return {}


def _job(tmp_path, fn: str, **env):
    from kubedistill.core import pipeline, spec
    from kubedistill.core.stage import CONFIG_ENV
    from tests.conftest import minimal_doc

    (data, *_) = pipeline.build(spec.parse_run(minimal_doc(storage={"uri": str(tmp_path / "store")})))
    return subprocess.Popen(
        [sys.executable, "-m", "kubedistill.job", f"tests.unit.test_progress:{fn}"],
        env={**os.environ, CONFIG_ENV: data.config_json, "PYTHONPATH": os.getcwd(), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_failed_stage_job_keeps_its_driver_log_in_storage(tmp_path):
    job = _job(tmp_path, "loud_failure")
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 1, out
    store = Storage(str(tmp_path / "store" / "test-run"))
    assert store.read_json("data/_FAILED.json")["error"] == "ValueError: spec.data.logs: nothing there"
    (name,) = driverlog.stage_logs(store, "data")
    log = store.read_text(f"data/logs/{name}")
    for said in ("about to fail", "a C library complains", "Traceback", "[data] FAILED: ValueError"):
        assert said in log and said in out  # in storage, and in the job log as before
    assert f"[data] driver log kept at {store.uri(f'data/logs/{name}')}" in out


def test_a_stage_job_stopped_by_sigterm_fails_and_keeps_its_log(tmp_path):
    """What a RayJob's deadline or deletion does (Ray stops the entrypoint with SIGTERM), at a point the test
    controls: the job holds, the test sees the hold file, then stops it."""
    import signal
    import time

    holds = tmp_path / "holds"
    job = _job(tmp_path, "held", KUBEDISTILL_HOLD_AT="test.held", KUBEDISTILL_HOLD_DIR=str(holds))
    deadline = time.monotonic() + 120
    while not (holds / "test.held").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 1, out
    store = Storage(str(tmp_path / "store" / "test-run"))
    assert "stopped by signal 15" in store.read_json("data/_FAILED.json")["error"]
    (name,) = driverlog.stage_logs(store, "data")
    assert "working" in store.read_text(f"data/logs/{name}")


class _Tty:
    def __init__(self, tty: bool):
        self.text, self.tty = "", tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def test_kubedistill_run_updates_one_line_per_stage_on_a_terminal_and_prints_each_update_elsewhere():
    from kubedistill.runner import Console

    out = _Tty(tty=False)
    c = Console(out)
    c.progress("student-crsd", "1/4 steps (25%)")
    c.say("    student-crsd | a log line")
    c.progress("student-crsd", "2/4 steps (50%)")
    assert out.text.splitlines() == ["    student-crsd ▸ 1/4 steps (25%)", "    student-crsd | a log line",
                                     "    student-crsd ▸ 2/4 steps (50%)"]
    out = _Tty(tty=True)
    c = Console(out)
    c.progress("student-crsd", "1/4 steps (25%)")
    c.say("    student-crsd | a log line")  # printed above the progress line, which is drawn again below it
    c.progress("student-crsd", "2/4 steps (50%)")
    c.end_progress()
    assert out.text == ("\r\x1b[K    student-crsd ▸ 1/4 steps (25%)" "\r\x1b[K    student-crsd | a log line\n"
                        "    student-crsd ▸ 1/4 steps (25%)" "\r\x1b[K    student-crsd ▸ 2/4 steps (50%)" "\r\x1b[K")


def test_the_stage_heartbeat_speaks_between_loops_and_never_over_a_fresh_loop_report(tmp_path):
    store = Storage(str(tmp_path / "run"))
    lines, clock, wall = [], Clock(), [1_764_288_000.0]
    beat = progress.Heartbeat(store, "teacher-dpo", lambda: "sampling 4 responses for 400 prompts", heartbeat=25,
                              say=lines.append, clock=clock, wall=lambda: wall[0])
    clock.t += 70
    wall[0] += 70
    p = beat.beat()  # no loop has reported: the heartbeat does
    assert p is not None and p.unit == progress.HEARTBEAT_UNIT and p.done == 70
    assert lines == ["[teacher-dpo] progress running 1m10s · last: sampling 4 responses for 400 prompts"]
    assert progress.short(progress.read(store, "teacher-dpo")) == "running 1m10s"
    clock.t += 10
    wall[0] += 10
    assert beat.beat() is None  # its own last beat is 10 s old
    loop = progress.Progress("teacher-dpo", 10, write=progress.storage_sink(store, "teacher-dpo"), say=lines.append,
                             wall=lambda: wall[0])
    loop.update(3)
    loop.publish()  # a loop reports
    clock.t += 20
    wall[0] += 20
    assert beat.beat() is None  # the loop's report is 20 s old: fresh
    clock.t += 10
    wall[0] += 10
    assert beat.beat() is not None  # 30 s without a loop report: the stage's heartbeat again
    assert progress.read(store, "teacher-dpo").summary.startswith("running 1m50s")


def test_closing_publishes_the_last_state_once():
    lines, written, clock = [], [], Clock()
    p = _progress(lines, written, clock)
    p.update(100)
    p.close()
    p.close()  # nothing new: nothing printed again
    assert len(lines) == len(written) == 1 and lines[0].startswith("[student-crsd] progress 100/100 steps (100%)")
