"""The servers the tests start come up even when another program takes a port they were given."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest

from kubedistill.core.ports import PortInUse, Ports
from kubedistill.runner import (
    _HEAD_PORTS,
    RayStartTimedOut,
    RayUnavailable,
    _head_failure,
    ray_auth,
    start_ray_head,
    submit,
)
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


def test_ray_start_failures_are_told_apart_and_only_races_are_retried():
    # Ray's own fixed 30 s wait for its raylet, as `ray start` reports it (ray/_private/node.py)
    slow = ("INFO node.py:438 -- Failed to get node info b'RPC error: Deadline Exceeded'\nException: The current "
            "node timed out during startup. This could happen because some of the raylet failed to startup or the "
            "GCS has become overloaded.")
    assert _head_failure(slow) is RayStartTimedOut and issubclass(RayStartTimedOut, RayUnavailable)
    assert _head_failure("failed to bind: Address already in use") is PortInUse
    assert _head_failure("ValueError: Resource quantities must be nonnegative") is RayUnavailable


@pytest.mark.ray
def test_a_ray_head_that_cannot_start_says_so_with_its_log():
    with pytest.raises(RayUnavailable, match=r"(?s)the local Ray head exited with \d+; log \S+ray-head-\d+\.log:\n.*"
                                             r"Resource quantities must be nonnegative"):
        start_ray_head(num_cpus=-1)


# a job's driver, and a task of it that asks Ray's state API for its cluster without an address (as Ray
# Train's PlacementGroupCleaner does, to see whether the run's controller is alive)
JOB = """
import ray
ray.init()
print("joined", ray.get_runtime_context().gcs_address)

@ray.remote
def state_api():
    from ray.dashboard.utils import get_address_for_submission_client
    return get_address_for_submission_client(None)

print("state api", ray.get(state_api.remote()))
"""


@pytest.mark.ray
def test_a_local_heads_ray_client_server_is_told_the_runtime_env_agents_port_and_waits_for_no_raylet():
    # `ray start` always runs a Ray Client server. Told no runtime env agent port, it learned it from the
    # raylet's registration, waiting a fixed 30 s; a raylet that took 33 s under the suite's load made it
    # exit a second after the head reported itself up, and `ray start --block` tore the head down with it
    # (a clean-clone CI run of 374c153). Given the port, it starts without asking the GCS for the node
    import psutil

    head = start_ray_head(num_cpus=1)
    try:
        agent_port = head.ports.numbers[_HEAD_PORTS.index("runtime-env-agent-port")]
        procs = psutil.Process(head.proc.pid).children(recursive=True)
        client_servers = [p.cmdline() for p in procs if "ray.util.client.server" in p.cmdline()]
        assert len(client_servers) == 1, [p.cmdline() for p in procs]
        flags = dict(a.split("=", 1) for a in client_servers[0] if a.startswith("--") and "=" in a)
        agent = urlparse(flags["--runtime-env-agent-address"])
        assert agent.port == agent_port, client_servers[0]
        # and the agent Ray started listens there (the stages' runtime envs are set up through it)
        with socket.create_connection((agent.hostname, agent_port), timeout=10):
            pass
    finally:
        head.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_two_local_ray_heads_on_one_machine_run_each_ones_jobs_on_its_own_cluster():
    # Ray's job agent tells a job's driver which cluster to join from the address the last `ray start`
    # wrote into its temp dir: two heads sharing /tmp/ray sent the first one's jobs to the second. Ray's
    # state API, called without an address inside the cluster, reads /tmp/ray's record: another
    # cluster's (or none), unless the head tells its processes their own (RAY_ADDRESS)
    from ray.job_submission import JobStatus, JobSubmissionClient

    first = start_ray_head(num_cpus=1)
    try:
        second = start_ray_head(num_cpus=1)  # started later: the one a shared temp dir would name
        try:
            with ray_auth(first.auth_env):
                client = JobSubmissionClient(first.dashboard_url)
                job = submit(client, entrypoint=f"{sys.executable} -c {shlex.quote(JOB)}")
                deadline = time.monotonic() + 120
                while (state := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                    assert time.monotonic() < deadline, client.get_job_logs(job)
                    time.sleep(0.5)
                logs = client.get_job_logs(job)
            assert state == JobStatus.SUCCEEDED, logs
            joined = next(line for line in logs.splitlines() if line.startswith("joined "))
            assert joined.endswith(f":{first.ports[0]}") and not joined.endswith(f":{second.ports[0]}"), logs
            assert f"state api {first.dashboard_url}" in logs, logs
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.ray
def test_every_process_of_a_local_head_gets_its_settings(ray_address):
    # the stages' job drivers and workers are started by the head's raylet: they see what the head was started
    # with (no worker prestart, Ray Train polling its workers every 0.25 s, no preemption watcher), which Ray
    # Train passes on from a driver to its controller
    import ray

    from kubedistill.runner import _LOCAL_HEAD_ENV

    @ray.remote(num_cpus=0)
    def settings() -> dict[str, str | None]:
        import os

        return {k: os.environ.get(k) for k in _LOCAL_HEAD_ENV}

    was_connected = ray.is_initialized()
    if not was_connected:
        ray.init(address=ray_address, log_to_driver=False, logging_level="WARNING")
    try:
        assert ray.get(settings.remote(), timeout=120) == _LOCAL_HEAD_ENV
    finally:
        if not was_connected:
            ray.shutdown()
