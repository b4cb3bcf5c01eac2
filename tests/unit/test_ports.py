"""Ports for the servers we start: never from the ephemeral range, never one another session holds,
never one that is bound, and a start that loses a port to another program retried on fresh ones."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from kubedistill.core import ports
from kubedistill.core.ports import PortInUse, Ports, PortsUnavailable, start_with_retries


@pytest.fixture(autouse=True)
def _own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ports.LOCK_DIR_ENV, str(tmp_path / "locks"))


def test_claimed_ports_are_distinct_and_outside_the_ephemeral_range():
    lo, hi = ports.ephemeral_range()
    with Ports.claim(40) as p:
        assert len(set(p)) == 40
        assert all(not lo <= n <= hi and n >= ports.LOWEST for n in p)


def test_a_port_claimed_by_another_process_is_never_handed_out(tmp_path):
    with Ports.claim(1) as mine:
        port = mine[0]
        # another process (a parallel test session) claims from the same candidates: it must skip ours
        code = ("import sys; from kubedistill.core.ports import Ports; "
                f"p = Ports.claim(1, candidates=[{mine[0]}, {mine[0]} + 1]); print(p[0])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert int(out.stdout) == mine[0] + 1
    # released: claimable again
    with Ports.claim(1, candidates=[port]) as again:
        assert again[0] == port


def test_a_bound_port_is_skipped_and_running_out_says_so():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(PortsUnavailable, match="found 0 of 1"):
            Ports.claim(1, candidates=[taken])


def test_start_with_retries_claims_fresh_ports_after_a_bind_failure():
    seen: list[list[int]] = []

    def start(p: Ports) -> str:
        seen.append(p.numbers)
        if len(seen) == 1:
            raise PortInUse("address already in use")
        return "up"

    result, held = start_with_retries("toy", start, 2)
    assert result == "up" and held.numbers == seen[1] and seen[0] != seen[1]
    held.release()
    with pytest.raises(PortInUse, match="toy could not bind its ports in 2 tries"):
        start_with_retries("toy", lambda p: (_ for _ in ()).throw(PortInUse("busy")), 1, tries=2)


def test_start_with_retries_retries_only_the_races_it_is_told_of():
    class SlowStart(RuntimeError):
        pass

    attempts: list[int] = []

    def start(p: Ports) -> str:
        attempts.append(p[0])
        if len(attempts) == 1:
            raise SlowStart("timed out during startup")
        return "up"

    result, held = start_with_retries("toy", start, 1, retry_on=(SlowStart,))
    assert result == "up" and len(attempts) == 2
    held.release()
    with pytest.raises(SlowStart, match="toy did not start in 2 tries:\ntimed out"):
        start_with_retries("toy", lambda p: (_ for _ in ()).throw(SlowStart("timed out")), 1, tries=2,
                           retry_on=(SlowStart,))
    attempts.clear()
    with pytest.raises(SlowStart):  # not named: the first failure ends it, its ports released
        start_with_retries("toy", start, 1)
    assert len(attempts) == 1
    Ports.claim(1, candidates=[attempts[0]]).release()  # released: it can be claimed again
