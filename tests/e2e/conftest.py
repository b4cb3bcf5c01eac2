"""The end-to-end harness: an emulated Kubernetes API (kmock), the real operator process
(`python operator/run.py`: kopf run of operator/handlers.py), a local Ray cluster and the KubeRay stand-in."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubedistill.cluster.security import CREDENTIALS_LABEL
from kubedistill.core.ports import PortInUse, Ports, looks_like_bind_failure, start_with_retries
from tests.conftest import ACCESS_KEY, ROOT, SECRET_KEY, free_port
from tests.e2e.kuberay import Api

RUNS = "/apis/kubedistill.io/v1alpha1/namespaces/{ns}/distillationruns"


class Process:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(what: str, fn: Callable[[], Any], timeout: float, every: float = 0.5, logs: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{logs()[-6000:]}" if logs else ""))


class Cluster:
    """The emulated API server plus helpers to apply and read resources."""

    def __init__(self, tmp: Path, kuberay: bool):
        self.tmp = tmp
        flags = [] if kuberay else ["--no-kuberay"]

        def start(ports: Ports) -> Process:
            log = tmp / f"apiserver-{ports[0]}.log"
            server = Process([sys.executable, "-m", "tests.e2e.apiserver", "--port", str(ports[0]), *flags],
                             dict(os.environ), log)
            self.api = Api(f"http://127.0.0.1:{ports[0]}")
            wait_for("the API server", lambda: self._up() or not server.alive(), 60, logs=server.text)
            if not server.alive():
                text = server.text()
                server.stop()
                err = PortInUse if looks_like_bind_failure(text) else RuntimeError
                raise err(f"the emulated Kubernetes API server exited; log {log}:\n{text[-3000:]}")
            return server

        self.server, self._ports = start_with_retries("the emulated Kubernetes API server", start, 1)
        self.port = self._ports[0]
        self.kubeconfig = tmp / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: e2e\n"
            f"clusters: [{{name: e2e, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: e2e, user: {token: e2e}}]\n"
            "contexts: [{name: e2e, context: {cluster: e2e, user: e2e, namespace: default}}]\n")
        self.operators: list[Process] = []

    def _up(self) -> bool:
        try:
            self.api.call("GET", "/version")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def start_operator(self, allowed_endpoints: str = "", resync: float = 600.0, retry: float = 1.0,
                       progress: float = 1.0) -> Process:
        """The operator process; `allowed_endpoints` is the chart's storage.allowedEndpoints (plain HTTP S3);
        `resync` and `retry` its resyncInterval and retryInterval (seconds). The resync is far enough away that
        a test passing shows the operator acted on watch events and its own retry timers, not on a sweep."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBEDISTILL_RESYNC_INTERVAL": str(resync),
               "KUBEDISTILL_RETRY_INTERVAL": str(retry), "KUBEDISTILL_PROGRESS_INTERVAL": str(progress),
               "KUBEDISTILL_METRICS_PORT": str(free_port()),
               "KUBEDISTILL_ALLOWED_ENDPOINTS": allowed_endpoints}
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # credentials come from the run's Secret
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics = f"http://127.0.0.1:{env['KUBEDISTILL_METRICS_PORT']}/"
        op = Process([sys.executable, "operator/run.py", "--all-namespaces",
                      "--standalone", f"--liveness={self.liveness}"], env,
                     self.tmp / f"operator-{len(self.operators)}.log")
        self.operators.append(op)
        return op

    def operator_logs(self) -> str:
        """The operator's warnings and errors, then the cluster's state: what a failed wait shows."""
        import json

        lines = [x for p in self.operators for x in p.text().splitlines() if "Handler 'run_changed' succeeded" not in x
                 and "Handler 'child_changed' succeeded" not in x]
        state = {"runs": [r.get("status") for r in self.api.items("/apis/kubedistill.io/v1alpha1/distillationruns")]}
        try:
            state["rayjobs"] = {j["metadata"]["name"]: j.get("status") for j in self.api.items("/apis/ray.io/v1/rayjobs")}
            state["rayservices"] = {j["metadata"]["name"]: j.get("status") for j in self.api.items("/apis/ray.io/v1/rayservices")}
        except Exception as e:  # noqa: BLE001 - KubeRay may be absent on purpose
            state["kuberay"] = repr(e)
        return "\n".join(lines[-60:]) + "\n" + json.dumps(state, indent=1)

    def secret(self, ns: str, name: str, data: dict[str, str], opt_in: bool = True) -> None:
        """A Secret; `opt_in` labels it as storage credentials the operator may read."""
        labels = {CREDENTIALS_LABEL: "true"} if opt_in else {}
        self.api.call("POST", f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    def apply(self, doc: dict[str, Any], ns: str = "default") -> dict[str, Any]:
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": ns}}
        return self.api.call("POST", RUNS.format(ns=ns), doc)

    def run(self, name: str, ns: str = "default") -> dict[str, Any] | None:
        return self.api.get(f"{RUNS.format(ns=ns)}/{name}")

    def children(self, plural: str, ns: str = "default") -> list[dict[str, Any]]:
        return self.api.items(f"/apis/ray.io/v1/namespaces/{ns}/{plural}")

    def events(self, ns: str = "default") -> list[dict[str, Any]]:
        return self.api.items(f"/api/v1/namespaces/{ns}/events")

    def phase(self, name: str, *phases: str, ns: str = "default") -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            run = self.run(name, ns)
            return run if run and (run.get("status") or {}).get("phase") in phases else None
        return check

    def close(self) -> None:
        for op in self.operators:
            op.stop()
        self.server.stop()
        self._ports.release()


@contextlib.contextmanager
def _cluster(tmp_path: Path, kuberay: bool) -> Iterator[Cluster]:
    c = Cluster(tmp_path, kuberay=kuberay)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with _cluster(tmp_path, kuberay=True) as c:
        yield c


@pytest.fixture
def cluster_without_kuberay(tmp_path: Path) -> Iterator[Cluster]:
    with _cluster(tmp_path, kuberay=False) as c:
        yield c


@pytest.fixture(scope="module")
def ray_dashboard() -> Iterator[str]:
    """A local Ray cluster whose workers import the repository (ray_apps.student), like the image would."""
    from kubedistill.runner import local_ray

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([old] if old else []))
    try:
        with local_ray() as session:
            yield session.dashboard
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def s3_secret() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
