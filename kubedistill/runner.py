"""The local executor: run a DistillationRun's stages as Ray jobs on a local (or given) Ray cluster.

The operator runs the same entrypoints (`python -m kubedistill.job <stage function>`) inside KubeRay
RayJobs; only the executor differs. Stage config travels as JSON in an environment variable, never through a shell.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kubedistill.core import pipeline, policy, progress
from kubedistill.core.holds import HOLD_AT_ENV, HOLD_DIR_ENV
from kubedistill.core.ports import PortInUse, Ports, PortsUnavailable, looks_like_bind_failure, start_with_retries
from kubedistill.core.spec import API_GROUP, Condition, DistillationRun, RunStatus, StageStatus, to_wire
from kubedistill.core.stage import (
    CONFIG_ENV,
    FAILURE,
    JOB_ENV,
    CorruptManifest,
    must_read_manifest,
    now,
    read_manifest,
    run_storage,
)
from kubedistill.core.storage import Storage

STATUS_FILE = "_status.json"
#: Environment passed through to stage jobs (credentials and endpoints; never user spec strings).
_PASS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    # the jobs run on this machine with this interpreter: they import what the CLI can (a stage of your own)
    "PYTHONPATH",
    HOLD_AT_ENV,
    HOLD_DIR_ENV,
)


class RayUnavailable(RuntimeError):
    """The Ray cluster to run on cannot be started or reached; the message says what to do."""


class RunFailed(RuntimeError):
    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage {stage} failed: {message}")


#: The head's ports we choose (the rest, e.g. workers', Ray binds to port 0 and learns from the kernel).
#: The runtime env agent's is chosen too, not for a collision: with port 0 the Ray Client server (which
#: `ray start` always runs once grpc is installed, and which Ray refuses to run on a port below 1024) learns
#: the agent's port from the raylet's registration, waiting a fixed 30 s for it (`get_node_with_retry` in
#: ray/_private/services.py); a raylet slower than that under load made it exit, and `ray start --block`
#: then tore the whole head down a second after reporting it up. Given the port it waits for nothing.
_HEAD_PORTS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "ray-client-server-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
#: what `ray start --block` prints once every process is up (Ray is pinned to 2.60.x in pyproject.toml)
_HEAD_READY = "This command will now block forever"


@dataclass
class RayHead:
    """A local Ray head started by `start_ray_head`: its process, ports and log."""

    proc: subprocess.Popen[bytes]
    ports: Ports
    log: Path
    #: what a driver or client needs in its environment to talk to this head (token authentication)
    auth_env: dict[str, str]

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def metrics_port(self) -> int:
        return self.ports[4]

    def stop(self, grace: float = 3.0, timeout: float = 15.0) -> None:
        """Stop the head and every process it started (gcs, raylet, workers), then free its ports.

        SIGTERM first, SIGKILL what is left after `grace` seconds (gcs_server, the raylet and `ray start`
        itself ignore SIGTERM for long; `ray stop` waits 16 s for them: a throwaway local cluster whose
        driver has disconnected has nothing left to flush). A process that has exited but is not reaped
        yet (a zombie of `ray start`, or of a container's PID 1 that reaps nothing) counts as gone."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
            for p in procs:
                with suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            deadline = time.monotonic() + wait
            while (procs := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not procs:
                break
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.ports.release()


def _running(p: Any) -> bool:
    """`p` (a psutil.Process; psutil comes with Ray) has not exited."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


#: what every process of a local head gets in its environment:
#: - no worker prestart: Ray prestarts a worker per CPU for each job's driver; a stage job's tasks need its
#:   runtime env, so those workers idled and were killed unused (10 processes, each importing Ray, in a
#:   run of the teacher stages)
#: - no Ray Train preemption watcher (an actor per training run polling for node drains): the one node
#:   here is this machine, and a drain of it is the run's own stop
#: - Ray Train's controller polls its workers every 0.25 s, not 2 s: it moves from one state to the next
#:   (workers started, training, finished) only on a poll, so each training run paid seconds of waiting at
#:   start and end, 8 runs in a quickstart (benchmarks/train_startup.py); clusters keep Ray's default
_LOCAL_HEAD_ENV = {
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


class RayStartTimedOut(RayUnavailable):
    """`ray start` gave up waiting for its own raylet to register with its GCS: Ray waits a fixed 30 s
    (`raylet_start_wait_time_s` in ray/_private/node.py, not configurable), which a loaded machine can
    exceed with nothing wrong. The one start-up failure that is retried (on fresh ports) besides a bind."""


def _head_failure(log: str) -> type[Exception]:
    """What a failed `ray start` log means: a port taken, Ray's own start-up timeout, or anything else."""
    if looks_like_bind_failure(log):
        return PortInUse
    if "The current node timed out during startup" in log:
        return RayStartTimedOut
    return RayUnavailable


def start_ray_head(num_cpus: int | None = None, timeout: float = 180.0) -> RayHead:
    """Start a Ray head on this machine with `ray start --head --block`, every port it listens on by number
    chosen by `kubedistill.core.ports` (Ray's fixed defaults, 6379, 8265, 10001 and the dashboard agent's
    52365, collide with any other Ray on the machine; `ray.init` cannot set the agent's). A port taken
    after it was claimed makes Ray fail to bind: the head is started again on fresh ports.

    The head stays in this process's group, so Ctrl-C or a kill of the group stops it with us. It
    requires a token of its own (Ray's token authentication): other local users cannot submit jobs."""
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def start(ports: Ports) -> RayHead:
        # a temp dir of its own: Ray's job agent points each job's driver at the cluster that the last
        # `ray start` in its temp dir recorded (<temp dir>/ray_current_cluster); with the shared default,
        # /tmp/ray, two heads on one machine send each other's jobs to the wrong (or a stopped) cluster
        tmp = Path(tempfile.mkdtemp(prefix="kubedistill-ray-"))
        log = tmp / f"ray-head-{ports[0]}.log"
        argv = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--temp-dir={tmp}",
            *(f"--{flag}={port}" for flag, port in zip(_HEAD_PORTS, ports, strict=True)),
        ]
        if num_cpus is not None:
            argv.append(f"--num-cpus={num_cpus}")
        with open(log, "wb") as fh:
            # RAY_ADDRESS: a process inside the cluster that asks for "the" cluster without an address (Ray
            # Train's placement group cleaner does, through the state API) is told this one, not whichever
            # cluster last recorded itself in /tmp/ray (another user's, a stopped one, or none)
            env = {**os.environ, **auth_env, **_LOCAL_HEAD_ENV, "RAY_ADDRESS": f"127.0.0.1:{ports[0]}"}
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        head = RayHead(proc, ports, log, auth_env)
        deadline = time.monotonic() + timeout
        while _HEAD_READY not in (text := log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                head.stop()  # also releases the ports; start_with_retries claims fresh ones
                tail = text[-3000:]
                why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout:.0f}s"
                raise _head_failure(text)(f"the local Ray head {why}; log {log}:\n{tail}")
            time.sleep(0.2)
        return head

    try:
        head, _ = start_with_retries("the local Ray head", start, len(_HEAD_PORTS), retry_on=(RayStartTimedOut,))
    except (PortInUse, PortsUnavailable) as e:
        raise RayUnavailable(str(e)) from e
    return head


def _reload_ray_auth() -> None:
    """Make an imported Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN (it caches both on first use)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # Cython, no stubs

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def ray_auth(env: dict[str, str]) -> Iterator[None]:
    """`env` (a head's token) in this process's environment, and Ray made to read it, until the block ends."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _reload_ray_auth()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_ray_auth()


@dataclass
class RaySession:
    """This process connected as a driver: the cluster's dashboard (job API) URL, and the head we
    started (None when the cluster was given by address)."""

    dashboard: str
    head: RayHead | None


@contextmanager
def local_ray(address: str | None = None, num_cpus: int | None = None) -> Iterator[RaySession]:
    """Start a local Ray head for the run (or use the cluster at `address`) and connect to it."""
    import ray

    with ExitStack() as stack:
        head = None
        if not address:
            head = start_ray_head(num_cpus)
            stack.callback(head.stop)
            stack.enter_context(ray_auth(head.auth_env))
        try:
            ctx = ray.init(address=head.gcs_address if head else address, log_to_driver=False, logging_level="WARNING")
        except ConnectionError as e:
            raise RayUnavailable(
                f"cannot connect to Ray at {address}: {e}. Start one with `ray start --head`, or "
                "omit --address to start a local one for this run"
            ) from e
        stack.callback(ray.shutdown)
        url = head.dashboard_url if head else ctx.dashboard_url
        if not url:
            raise RayUnavailable(
                "the Ray cluster has no dashboard; stage jobs need its job API: install "
                "ray[default] (and start the head with --include-dashboard=true)"
            )
        yield RaySession(url if url.startswith("http") else f"http://{url}", head)


class Console:
    """What `kubedistill run` prints: lines, and on a terminal one line per running stage that updates in
    place with its progress (kept below the log lines); elsewhere (a file, CI) each update is a line of its own."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self._bar: str | None = None

    def say(self, msg: str) -> None:
        if self._bar is not None:
            self.out.write("\r\x1b[K")
        print(msg, file=self.out, flush=True)
        if self._bar is not None:
            self.out.write(self._bar)
            self.out.flush()

    def progress(self, stage: str, summary: str) -> None:
        if not self.tty:
            self.say(f"    {stage} ▸ {summary}")
            return
        self._bar = f"    {stage} ▸ {summary}"
        self.out.write(f"\r\x1b[K{self._bar}")
        self.out.flush()

    def end_progress(self) -> None:
        if self._bar is not None:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._bar = None


class StatusWriter:
    """Keeps the run's status (the CRD status shape) in storage at <run>/_status.json."""

    def __init__(self, storage: Storage, stages: list[pipeline.Stage]):
        self.storage = storage
        self.status = RunStatus(phase="Pending", stages=[StageStatus(name=s.name) for s in stages])

    def stage(self, name: str) -> StageStatus:
        return next(s for s in self.status.stages if s.name == name)

    def save(self) -> None:
        self.storage.write_json(STATUS_FILE, to_wire(self.status))


def _job_entrypoint(stage: pipeline.Stage) -> str:
    """The stage's entrypoint run by this interpreter (the one kubedistill is installed in)."""
    return shlex.join([sys.executable, *shlex.split(stage.entrypoint)[1:]])


def _job_env(stage: pipeline.Stage) -> dict[str, str]:
    """A stage job's environment: the credentials and endpoints passed through, the job's markers, its config."""
    passed = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    return {**passed, **JOB_ENV, CONFIG_ENV: stage.config_json, "PYTHONUNBUFFERED": "1"}


def run_stages(
    run: DistillationRun, names: tuple[str, ...], dashboard: str, poll_s: float = 0.5
) -> dict[str, dict[str, Any]]:
    """Only the stages `names` of `run`, in graph order, each submitted as a Ray job to the cluster whose job API
    is at `dashboard`, with the entrypoint and environment `run_local` gives it (credentials passed through); their
    manifests. For benchmarks that change one stage's settings and keep the stages before it: a stage already done
    for the spec skips itself (the step policy), and a failed one raises RunFailed with the error its job
    recorded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    stages = pipeline.build(run)
    storage = run_storage(stages[0].config)
    for stage in stages:
        if stage.name not in names:
            continue
        job = submit(client, entrypoint=_job_entrypoint(stage), runtime_env={"env_vars": _job_env(stage)})
        while (state := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            time.sleep(poll_s)
        if state != JobStatus.SUCCEEDED:
            raise RunFailed(stage.name, _failure_reason(storage, stage.name, client.get_job_info(job).message))
    return {name: must_read_manifest(storage, name) for name in names}


def submit(client: Any, wait_s: float = 120.0, **job: Any) -> str:
    """`submit_job`, waiting while a just-started Ray's job agent is not up yet ("No available agent")."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def run_local(
    run: DistillationRun,
    *,
    address: str | None = None,
    out: TextIO = sys.stdout,
    poll_s: float = 0.5,
    serve_port: int = 8000,
    keep_serving: bool = False,
) -> RunStatus:
    """Run every stage in order; skip those already done; stop at the first failure.

    With a `serve` stage the student is deployed on Ray Serve at 127.0.0.1:`serve_port`; with
    `keep_serving` (and a local cluster, which ends with this call) it stays up until interrupted.
    """
    stages = pipeline.build(run)
    storage = run_storage(stages[0].config)
    storage.check_writable()
    status = StatusWriter(storage, stages)
    console = Console(out)
    say = console.say

    started = time.monotonic()
    say(f"kubedistill: run {run.name} -> {storage.uri()}  ({len(stages)} stages)")
    status.status.phase = "Running"
    status.save()
    from ray.job_submission import JobSubmissionClient

    with local_ray(address) as session:
        dashboard = session.dashboard
        if threading.current_thread() is threading.main_thread():
            install_signal_handlers()  # ray.init replaced ours
        client = JobSubmissionClient(dashboard)
        say(f"kubedistill: Ray dashboard {dashboard}")
        try:
            _run_stages(run, stages, storage, status, client, console, poll_s, serve_port)
        finally:
            from kubedistill import report

            try:
                say(
                    f"kubedistill: run report at {report.write(storage, run.name, [s.name for s in stages], status.status)}"
                )
            except Exception as e:  # noqa: BLE001 - never hide the run's own outcome behind the report's
                say(f"kubedistill: could not write the run report: {type(e).__name__}: {e}")
        took = int(time.monotonic() - started)
        say(
            f"kubedistill: run {run.name} succeeded in {took // 60} min {took % 60} s; status at {storage.uri(STATUS_FILE)}"
        )
        served = next((s for s in status.status.stages if s.name == "serve" and s.phase == "Succeeded"), None)
        if served:
            from kubedistill.stages.data import read_dataset
            from kubedistill.stages.serving import answer_lines, curl_example, example_request, post_json

            url = must_read_manifest(storage, "serve")["outputs"]["url"]
            say(f"kubedistill: serving the student at {url}")
            try:  # an example of the run's own held-out data, and what the student answers to it
                held_out = Storage(must_read_manifest(storage, "data")["artifact"], storage.options).child("eval")
                body, truth = example_request(read_dataset(held_out), run.spec.labels)
                say(f"  try: {curl_example(url, body)}")
                code, answer = post_json(url, body)
                said = answer_lines(body, truth, answer) if code == 200 else [f"HTTP {code}: {answer}"]
                say(
                    "  its answer (a held-out query of this run, each service beside its true label):\n"
                    + "\n".join(f"    {line}" for line in said)
                )
            except (OSError, ValueError, KeyError) as e:  # the run succeeded; an example never hides that
                say(f"  (no example request: {type(e).__name__}: {e})")
            if keep_serving and not address:
                say("kubedistill: serving until interrupted (Ctrl-C stops it and the local Ray cluster)")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    say("kubedistill: stopped serving")
    return status.status


def _run_stages(
    run: DistillationRun,
    stages: list[pipeline.Stage],
    storage: Storage,
    status: StatusWriter,
    client: Any,
    console: Console,
    poll_s: float,
    serve_port: int,
) -> None:
    """Each stage in order as a Ray job: skipped when done, gated, or run and followed; raises RunFailed."""
    from ray.job_submission import JobStatus

    say = console.say

    earlier: dict[str, policy.Step] = {}  # the steps of the stages before, as they stand now
    for i, stage in enumerate(stages, 1):
        st = status.stage(stage.name)
        tag = f"[{i}/{len(stages)}] {stage.name}"
        status.status.current_stage = stage.name
        try:
            step = policy.step(stage, lambda name: read_manifest(storage, name), earlier)
        except CorruptManifest as e:
            st.phase, st.message = "Failed", f"{e.stage}: {e}"
            status.status.phase = "Failed"
            status.save()
            say(f"{tag}: FAILED: {st.message}")
            raise RunFailed(stage.name, st.message) from None
        if step.state == "done":
            manifest = must_read_manifest(storage, stage.name)
            st.phase, st.message = "Succeeded", "done earlier for this config and these inputs; skipped"
            st.artifact, st.metrics, st.finished_at = manifest["artifact"], manifest["metrics"], manifest["finishedAt"]
            say(f"{tag}: done earlier, skipped")
            status.save()
            earlier[stage.name] = step
            continue
        if step.state == "skipped":
            why = step.gate_reason
            st.phase, st.message = "Skipped", step.reason
            status.status.conditions.append(
                Condition(type="Promoted", status="False", reason="GateFailed", message=why, last_transition_time=now())
            )
            say(f"{tag}: skipped, not promoted: {why}")
            status.save()
            earlier[stage.name] = step
            continue
        if not step.ready:  # an earlier stage failed or was skipped: the run stops before this one
            raise RunFailed(stage.name, step.reason or "its inputs are not done")
        if step.state == "stale":
            say(f"{tag}: rerunning: {step.reason}")
        env = {**_job_env(stage), "KUBEDISTILL_SERVE_PORT": str(serve_port)}
        st.phase, st.started_at, st.attempts = "Running", now(), st.attempts + 1
        job_id = submit(
            client,
            entrypoint=_job_entrypoint(stage),
            submission_id=f"{run.name}-{stage.name}-{int(time.time() * 1000)}",
            runtime_env={"env_vars": env},
            metadata={f"{API_GROUP}/run": run.name, f"{API_GROUP}/stage": stage.name},
        )
        st.job = job_id
        status.save()
        say(f"{tag}: running (Ray job {job_id})")
        t0, shown = time.monotonic(), 0
        try:
            while True:
                state = client.get_job_status(job_id)
                logs = client.get_job_logs(job_id)
                for line in logs[shown:].splitlines():
                    if (summary := progress.is_progress_line(line)) is not None:
                        _progress(storage, st, status, console, stage.name, summary)
                    elif line.strip():
                        say(f"    {stage.name} | {line}")
                shown = len(logs)
                if state in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    break
                time.sleep(poll_s)
        except BaseException:
            console.end_progress()
            client.stop_job(job_id)
            st.phase, st.message, st.finished_at = "Failed", "interrupted", now()
            status.status.phase = "Failed"
            status.save()
            raise
        console.end_progress()
        st.finished_at, st.progress, status.status.progress = now(), None, None
        written = read_manifest(storage, stage.name) if state == JobStatus.SUCCEEDED else None
        if written is not None:
            st.phase, st.artifact, st.metrics = "Succeeded", written["artifact"], written["metrics"]
            st.message = None
            say(f"{tag}: succeeded in {time.monotonic() - t0:.1f}s")
            status.save()
            earlier[stage.name] = policy.Step("done", True)
            continue
        reason = _failure_reason(storage, stage.name, client.get_job_info(job_id).message)
        st.phase, st.message = "Failed", reason
        status.status.phase = "Failed"
        status.save()
        say(f"{tag}: FAILED: {reason}")
        raise RunFailed(stage.name, reason)
    status.status.phase, status.status.current_stage = "Succeeded", None
    status.save()


def _progress(storage: Storage, st: StageStatus, status: StatusWriter, console: Console, stage: str, line: str) -> None:
    """A progress line in the stage's log: its report (the file the line announces) into the run's status, and
    the stage's progress line updated."""
    report = progress.read(storage, stage)
    if report is not None and report.updated_at >= (st.started_at or ""):
        st.progress = report
        status.status.progress = f"{stage} {progress.short(report)}"
        status.save()
        line = report.summary
    console.progress(stage, line)


def _failure_reason(storage: Storage, stage: str, job_message: str | None) -> str:
    try:
        return storage.read_json(f"{stage}/{FAILURE}")["error"]
    except FileNotFoundError:
        return job_message or "the job ended without a manifest"


def read_status(storage: Storage) -> RunStatus | None:
    try:
        return RunStatus.model_validate(storage.read_json(STATUS_FILE))
    except FileNotFoundError:
        return None


def install_signal_handlers() -> None:
    """Turn SIGTERM (and SIGINT, unless the shell ignores it) into KeyboardInterrupt, so an
    interrupted run stops its job, records why and stops serving cleanly. Called again after
    `ray.init`, which installs its own fatal-signal handlers."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _raise)
