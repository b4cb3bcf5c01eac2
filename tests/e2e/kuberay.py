"""A test-side stand-in for the KubeRay operator, against the emulated API and a local Ray cluster.

It does for each object what KubeRay does, minus pods:
- RayJob: submits `spec.entrypoint` through Ray's job submission API with the env vars of
  `spec.runtimeEnvYAML` plus the Secret keys the pods would get (`secretKeyRef`; the run's token Secret must
  exist, as KubeRay's `authOptions` needs it), then writes
  `status.jobDeploymentStatus` / `jobStatus` / `message` as KubeRay does (Complete + SUCCEEDED, or
  Failed + FAILED with the job's message). The entrypoint (`python -m kubedistill.job ...`) runs with
  this interpreter from the repository root, as it would from the image's working directory.
- RayService: deploys `spec.serveConfigV2` through the Ray dashboard's Serve REST API (what KubeRay does)
  and writes the Ready condition and application statuses from what Serve reports.
A RayJob created suspended (queued on Kueue) stays `Suspended`, with no Ray job, until `spec.suspend` turns
false (Kueue admits it; a test does it as Kueue would), as KubeRay does.
It can also evict a stage's first attempt (stop its Ray job mid-run, like a lost node) to exercise
the operator's retries. It records every submission so tests can check nothing ran twice.
"""

from __future__ import annotations

import base64
import json
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubedistill.core.holds import HOLD_AT_ENV, HOLD_DIR_ENV


class Api:
    """Minimal JSON client of the emulated API server."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"}
        req = urllib.request.Request(self.url + path, json.dumps(body).encode() if body is not None else None,
                                     headers, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def items(self, path: str) -> list[dict[str, Any]]:
        return self.call("GET", path)["items"]

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", path)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


def _ray(ns: str, plural: str, name: str = "") -> str:
    return f"/apis/ray.io/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


class KubeRay:
    def __init__(self, api: Api, dashboard: str, serve_port: int, evict_at: dict[str, str] | None = None,
                 holds: Path | None = None, evict_on_request: bool = False):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
        from ray.job_submission import JobSubmissionClient

        self.api, self.dashboard, self.serve_port = api, dashboard.rstrip("/"), serve_port
        self.jobs = JobSubmissionClient(self.dashboard)
        self.serve = ServeSubmissionClient(self.dashboard)  # what `serve deploy` and KubeRay use
        # stage → the hold point (kubedistill.core.holds) at which its first attempt is evicted: the attempt
        # stops there, the stand-in sees the point reached, then evicts it (no timing involved)
        self.evict_at = dict(evict_at or {})
        self.holds = holds or Path(".")
        # with `evict_on_request`, a first attempt held at its point stays held until the test calls `evict(stage)`
        self.evict_on_request, self._requested = evict_on_request, set[str]()
        self._hold_dirs: dict[str, Path] = {}  # stage → its first attempt's hold dir
        self.submitted: list[tuple[str, str]] = []  # (RayJob name, attempt)
        self._running: dict[str, tuple[str, float, str]] = {}  # uid → (ray job id, start, ns/name)
        self._served: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> KubeRay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    def held(self, stage: str) -> bool:
        """The stage's first attempt has reached its hold point and waits there."""
        d = self._hold_dirs.get(stage)
        return d is not None and (d / self.evict_at[stage]).exists()

    def evict(self, stage: str) -> None:
        """Evict the stage's held first attempt (with `evict_on_request`)."""
        self._requested.add(stage)

    # ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                for job in self.api.items("/apis/ray.io/v1/rayjobs"):
                    self._rayjob(job)
                for svc in self.api.items("/apis/ray.io/v1/rayservices"):
                    self._rayservice(svc)
            except Exception as e:  # noqa: BLE001 - keep emulating; the test sees the errors
                self.errors.append(repr(e))

    def _secret(self, ns: str, name: str) -> dict[str, str] | None:
        secret = self.api.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def _env(self, ns: str, cluster: dict[str, Any], containers: list[dict[str, Any]]) -> dict[str, str]:
        """What the pods' environment would be: env values and single Secret keys (`secretKeyRef`; a missing
        Secret or required key keeps the pod from starting), after KubeRay checked the run's token Secret."""
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") == "token":
            token = self._secret(ns, auth["secretName"]) or {}
            if not token.get("auth_token"):
                raise RuntimeError(f"token secret {auth['secretName']} missing: KubeRay would not create the cluster")
        env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
        for c in containers:
            assert not c.get("envFrom"), "pods get single keys, never a whole Secret"
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref is None:
                    env[e["name"]] = e["value"]
                    continue
                secret = self._secret(ns, ref["name"])
                if secret is None or ref["key"] not in secret:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"secret {ref['name']} or its key {ref['key']} missing: the pod would not start")
                env[e["name"]] = secret[ref["key"]]
        return env

    def _rayjob(self, job: dict[str, Any]) -> None:
        meta, status = job["metadata"], job.get("status") or {}
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if status.get("jobDeploymentStatus") in ("Complete", "Failed"):
            return
        if job["spec"].get("suspend") and uid not in self._running:  # Kueue has not admitted it: no cluster
            if status.get("jobDeploymentStatus") != "Suspended":
                self._status(ns, "rayjobs", name, {"jobDeploymentStatus": "Suspended", "jobStatus": ""})
            return
        if uid not in self._running:
            head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
            env = self._env(ns, job["spec"]["rayClusterSpec"], head)
            env.update(yaml.safe_load(job["spec"]["runtimeEnvYAML"] or "{}").get("env_vars") or {})
            if self._evicting(job):
                stage = meta["labels"]["kubedistill.io/stage"]
                env.update({HOLD_AT_ENV: self.evict_at[stage], HOLD_DIR_ENV: str(self.holds / uid)})
                self._hold_dirs[stage] = self.holds / uid
            argv = shlex.split(job["spec"]["entrypoint"])
            assert argv[0] == "python", argv
            entry = shlex.join([sys.executable, *argv[1:]])
            job_id = self.jobs.submit_job(entrypoint=entry, runtime_env={"env_vars": env})
            self._running[uid] = (job_id, time.monotonic(), f"{ns}/{name}")
            self.submitted.append((name, meta.get("annotations", {}).get("kubedistill.io/attempt", "?")))
            self._status(ns, "rayjobs", name, {"jobDeploymentStatus": "Running", "jobStatus": "PENDING",
                                                "jobId": job_id, "startTime": _now()})
            return
        job_id, _, _ = self._running[uid]
        stage = meta["labels"]["kubedistill.io/stage"]
        requested = not self.evict_on_request or stage in self._requested
        if self._evicting(job) and requested and (self.holds / uid / self.evict_at[stage]).exists():
            self.jobs.stop_job(job_id)
            self._wait_terminal(job_id)
            self._status(ns, "rayjobs", name, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                                "reason": "AppFailed", "endTime": _now(),
                                                "message": "the head pod was evicted (node lost)"})
            return
        info = self.jobs.get_job_info(job_id)
        state = str(info.status)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            ok = state == "SUCCEEDED"
            self._status(ns, "rayjobs", name, {
                "jobDeploymentStatus": "Complete" if ok else "Failed", "jobStatus": state, "endTime": _now(),
                **({} if ok else {"reason": "AppFailed", "message": info.message or f"job {state}"})})
        elif status.get("jobStatus") != state:
            self._status(ns, "rayjobs", name, {"jobDeploymentStatus": "Running", "jobStatus": state, "jobId": job_id})

    def _evicting(self, job: dict[str, Any]) -> bool:
        meta = job["metadata"]
        return meta["labels"]["kubedistill.io/stage"] in self.evict_at and \
            meta.get("annotations", {}).get("kubedistill.io/attempt") == "1"

    def _wait_terminal(self, job_id: str) -> None:
        for _ in range(120):
            if str(self.jobs.get_job_status(job_id)) in ("SUCCEEDED", "FAILED", "STOPPED"):
                return
            time.sleep(0.5)

    def _rayservice(self, svc: dict[str, Any]) -> None:
        meta = svc["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = f"{meta['uid']}:{svc['spec']['serveConfigV2']}"  # deploy again when the config changes
        if key not in self._served:
            config = yaml.safe_load(svc["spec"]["serveConfigV2"])
            workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
            env = self._env(ns, svc["spec"]["rayClusterConfig"], workers)
            for app in config["applications"]:
                app.setdefault("runtime_env", {})["env_vars"] = env
            self.serve.deploy_applications({"http_options": {"host": "127.0.0.1", "port": self.serve_port}, **config})
            self._served.add(key)
        apps = self.serve.get_serve_details().get("applications") or {}
        statuses = {a: {"status": v["status"], "message": v.get("message", "")} for a, v in apps.items()}
        running = bool(statuses) and all(v["status"] == "RUNNING" for v in statuses.values())
        ready = {"type": "Ready", "status": "True" if running else "False",
                 "reason": "Running" if running else "Deploying", "message": ""}
        new = {"conditions": [ready], "activeServiceStatus": {"applicationStatuses": statuses}}
        if (svc.get("status") or {}) != new:
            self._status(ns, "rayservices", name, new)

    def _status(self, ns: str, plural: str, name: str, status: dict[str, Any]) -> None:
        self.api.call("PATCH", _ray(ns, plural, name) + "/status", {"status": status})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
