"""The servers the tests start come up even when another program takes a port they were given."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubedistill.ports import Ports
from kubedistill.runner import RayUnavailable, start_ray_head
from tests.conftest import SeaweedS3


@pytest.mark.s3
def test_seaweedfs_comes_up_on_fresh_ports_when_another_process_holds_one_it_was_given(tmp_path):
    # another process binds a port and listens on it, the way a program that ignores our claims would
    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys; s = socket.socket(); "
                               "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = int(holder.stdout.readline())
        claims: list[list[int]] = []

        def claim(n: int) -> Ports:
            p = Ports.claim(n)
            if not claims:  # the first attempt gets the held port for its volume server, as if another
                numbers = p.numbers  # program bound it after our check: weed cannot listen there
                p.release()
                p = Ports.given(numbers[:4] + [held] + numbers[5:])
            claims.append(p.numbers)
            return p

        s3 = SeaweedS3.start(tmp_path, claim=claim)
        try:
            assert len(claims) == 2 and held in claims[0] and held not in claims[1]
            assert "address already in use" in (tmp_path / "attempt-0" / "weed.log").read_text()
            s3.create_bucket("after-retry")
            s3.client().put_object(Bucket="after-retry", Key="k", Body=b"v")
            assert s3.client().get_object(Bucket="after-retry", Key="k")["Body"].read() == b"v"
        finally:
            s3.stop()
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.ray
def test_a_ray_head_that_cannot_start_says_so_with_its_log():
    with pytest.raises(RayUnavailable, match=r"(?s)the local Ray head exited with \d+; log \S+ray-head-\d+\.log:\n.*"
                                             r"Resource quantities must be nonnegative"):
        start_ray_head(num_cpus=-1)
