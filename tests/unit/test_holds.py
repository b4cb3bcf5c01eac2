"""The hold points tests interrupt runs at (kubedistill.core.holds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubedistill.core.holds import HOLD_AT_ENV, HOLD_DIR_ENV, hold

# A process that holds at "t.point", then (were the hold to return) writes `after`.
_HELD = ("import sys; from pathlib import Path; from kubedistill.core.holds import hold; "
         "hold('t.point'); Path(sys.argv[1]).write_text('written after the hold')")


def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's new parent may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_hold_not_named_returns_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv(HOLD_AT_ENV, "other.point")
    monkeypatch.setenv(HOLD_DIR_ENV, str(tmp_path))
    hold("t.point")
    assert list(tmp_path.iterdir()) == []


def test_a_held_process_whose_parent_is_killed_ends_without_writing(tmp_path):
    """What a killed run does to a job driver holding in a session of its own: its supervisor dies around it.
    The driver must end, not outlive the test, and must write nothing after the kill."""
    holds, after = tmp_path / "holds", tmp_path / "after"
    env = {**os.environ, HOLD_AT_ENV: "t.point", HOLD_DIR_ENV: str(holds), "PYTHONPATH": os.getcwd()}
    spawn = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {_HELD!r}, {str(after)!r}], "
             "start_new_session=True).wait()")
    parent = subprocess.Popen([sys.executable, "-c", spawn], env=env)
    deadline = time.monotonic() + 60
    while not (holds / "t.point").exists():
        assert parent.poll() is None and time.monotonic() < deadline, "the child never reached its hold"
        time.sleep(0.05)
    child = int((holds / "t.point").read_text())
    assert not _ended(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while not _ended(child):  # an event: the child's exit
        assert time.monotonic() < deadline, f"held process {child} outlived its parent"
        time.sleep(0.05)
    assert not after.exists()
