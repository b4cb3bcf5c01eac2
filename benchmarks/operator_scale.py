"""How the operator copes with 200 and 1,000 DistillationRuns against storage with real latency.

The stack, all real but Kubernetes itself: SeaweedFS's S3 gateway behind a proxy that holds every chunk
`--delay-ms` (10) in each direction, so each storage round trip costs 20 ms more (`tests/latency.py`; the
kernel here has no netem), the emulated Kubernetes API (`tests/e2e/apiserver.py`, logging each request) and
the real operator process (`python operator/run.py`, as the chart starts it). Every run reads its manifests
from that store through a Secret, as in a cluster, and each starts with its `data` stage done in storage, so its reconciles
really read storage. Nothing executes the RayJobs: this measures the operator, not Ray.

For each N (`--runs`, default 200 and 1000), against a fresh API server and operator:
1. Burst: N runs created at once; seconds until every run's first RayJob (its student's) exists.
2. Running steady state (every run has a running RayJob), `--window` seconds: API requests (watch streams
   aside) and S3 requests per minute, reconciles per second, the resync sweep's duration (`--resync`).
3. Reaction: one run's student RayJob turns Complete (its manifest written first, as the stage does); seconds
   until the operator has created the run's next RayJob (evaluate).
4. Finished steady state: N other runs whose every stage is done in storage, adopted by a fresh operator;
   then `--window` seconds: API and S3 requests per minute (the target: none).
5. The operator's peak memory (VmHWM) over 1 to 3.

Fairness: candidate and baseline run against the same kind of stack (a fresh API server, the same SeaweedFS
and proxy), with the same runs, one after the other in one invocation, on the same cores. Baseline, in the
same invocation: 1 to 3 and 5 against the operator of `--baseline` (a git revision of this
repository; default the last commit with the timer-driven operator: every run reconciled every 10 s on
kopf's thread pool), unpacked with `git archive`. Ratios are candidate vs baseline at the same N.

    python benchmarks/operator_scale.py [--runs 200 1000] [--window 120] [--resync 60] [--baseline cb449c7]

Writes `benchmarks/records/operator_scale.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubedistill import benchrecord  # noqa: E402
from kubedistill.cluster.security import CREDENTIALS_LABEL  # noqa: E402
from kubedistill.core import pipeline, spec, stage  # noqa: E402
from tests.conftest import ACCESS_KEY, SECRET_KEY, SeaweedS3, free_port, minimal_doc  # noqa: E402
from tests.e2e.kuberay import Api  # noqa: E402

RUNS = "/apis/kubedistill.io/v1alpha1/namespaces/default/distillationruns"
JOBS = "/apis/ray.io/v1/namespaces/default/rayjobs"
SECRET = "s3-credentials"
GATE = {"metrics": {"gate": {"candidate": "baseline", "passed": True, "reason": "ok"}}}


class Operator:
    """The code under test: this tree (`base` None) or an unpacked older revision."""

    def __init__(self, label: str, base: Path | None = None):
        self.label, self.base = label, base

    def env(self, resync: float) -> dict[str, str]:
        if self.base is None:
            return {"KUBEDISTILL_RESYNC_INTERVAL": str(resync), "KUBEDISTILL_RETRY_INTERVAL": "10"}
        return {"KUBEDISTILL_RECONCILE_INTERVAL": "10", "PYTHONPATH": str(self.base)}

    @property
    def cwd(self) -> Path:
        return self.base or ROOT

    @property
    def launch(self) -> list[str]:
        """How the chart starts it: the launcher, or (before it) `kopf run` itself."""
        return ["operator/run.py"] if (self.cwd / "operator" / "run.py").exists() else [
            "-m", "kopf", "run", "operator/handlers.py"]


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets); NaN when the operator has no such metric."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    found = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name) and not x.startswith("#")]
    return sum(found) if found else float("nan")


@contextlib.contextmanager
def _latency(s3: SeaweedS3, delay_ms: float) -> Iterator[str]:
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "tests.latency", "--port", str(port), "--to",
                              f"127.0.0.1:{s3.port}", "--delay-ms", str(delay_ms)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        proxy.wait(30)


class Stack:
    def __init__(self, api: Api, op: subprocess.Popen, server: subprocess.Popen, metrics: str, requests: Path):
        self.api, self.op, self.server, self.metrics, self.requests = api, op, server, metrics, requests

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (the operator, the API server)."""
        return _cpu_s(self.op.pid), _cpu_s(self.server.pid)

    def api_requests(self) -> list[str]:
        """The API requests so far, watch streams aside."""
        return [x for x in self.requests.read_text().splitlines() if "watch=" not in x]


@contextlib.contextmanager
def _stack(tmp: Path, who: Operator, endpoint: str, resync: float) -> Iterator[Stack]:
    """An emulated API server logging its requests, the storage Secret, and the operator against them."""
    port, metrics = free_port(), free_port()
    requests = tmp / f"requests-{port}.log"
    server = subprocess.Popen([sys.executable, "-m", "tests.e2e.apiserver", "--port", str(port), "--log-requests",
                               str(requests)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    api = Api(f"http://127.0.0.1:{port}")
    api.call("POST", "/api/v1/namespaces/default/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": "default",
                                                          "labels": {CREDENTIALS_LABEL: "true"}},
        "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}})
    kubeconfig = tmp / f"kubeconfig-{port}"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: b\n"
        f"clusters: [{{name: b, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: b, user: {token: b}}]\ncontexts: [{name: b, context: {cluster: b, user: b}}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # credentials come from the Secret
    env.update(KUBECONFIG=str(kubeconfig), KUBEDISTILL_METRICS_PORT=str(metrics),
               KUBEDISTILL_ALLOWED_ENDPOINTS=endpoint, **who.env(resync))
    log = open(tmp / f"operator-{who.label}-{port}.log", "w")  # noqa: SIM115 - closed below
    op = subprocess.Popen([sys.executable, *who.launch, "--all-namespaces", "--standalone", "--quiet"], cwd=who.cwd,
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{metrics}/"
        deadline = time.monotonic() + 120
        while True:  # started: its metrics endpoint answers (it starts after kopf's start-up handlers)
            try:
                _metric(url, "kubedistill_operator_reconciles")
                break
            except OSError:
                if op.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not start; log {log.name}") from None
                time.sleep(0.5)
        yield Stack(api, op, server, url, requests)
        assert op.poll() is None, (tmp / log.name).read_text()[-3000:]
    finally:
        for proc in (op, server):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        print(f"  operator log: {log.name}", flush=True)


def _doc(name: str, bucket: str, endpoint: str) -> dict[str, Any]:
    doc = minimal_doc(storage={"uri": f"s3://{bucket}/runs", "endpoint": endpoint, "secretRef": {"name": SECRET}},
                      teacher={"enabled": False}, annotation={"enabled": False}, pruning={"enabled": False})
    doc["metadata"] = {"name": name, "namespace": "default"}
    return doc


def _complete(doc: dict[str, Any], stages: Callable[[str], bool], direct: str) -> None:
    """Write the manifests of the run's stages that `stages` names, as the stages themselves would, straight to
    the store at `direct` (set-up, not measured: the stages' config hashes do not depend on the endpoint)."""
    doc = {**doc, "spec": {**doc["spec"], "storage": {**doc["spec"]["storage"], "endpoint": direct}}}
    for s in pipeline.build(spec.parse_run(doc)):
        if stages(s.name):
            stage.execute(stage.StageContext(s.config, stage.run_storage(s.config)), lambda ctx: GATE)


def _in_parallel(fn: Callable[[Any], Any], items: list[Any]) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(fn, items))


def _wait(what: str, check: Callable[[], bool], timeout: float, every: float = 1.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def _settle(stack: Stack, phase: str, n: int, timeout: float) -> float:
    """Seconds until all `n` runs show `phase` in their status and the operator has nothing left to do (its
    queue and its run reports; an operator without those gauges: 10 s more)."""
    t0 = time.monotonic()
    _wait(f"every run {phase}", lambda: sum(
        (r.get("status") or {}).get("phase") == phase for r in stack.api.items(RUNS)) == n, timeout, 2)
    busy = ("kubedistill_operator_queue_depth", "kubedistill_operator_reconciles_in_flight",
            "kubedistill_operator_reports_pending")
    if any(math.isnan(_metric(stack.metrics, m)) for m in busy):  # the baseline has no such gauges
        time.sleep(10)
    else:
        _wait("the operator idle", lambda: all(_metric(stack.metrics, m) == 0 for m in busy), timeout, 0.5)
    return time.monotonic() - t0


def _created(stack: Stack, n: int, timeout: float) -> float:
    """Seconds until the operator has sent N RayJob creations (read from the API server's request log, so the
    wait costs the API server nothing); then checked against the API."""
    t0 = time.monotonic()
    _wait("every first RayJob", lambda: sum(
        x.startswith("POST /apis/ray.io/v1/namespaces/default/rayjobs") for x in stack.api_requests()) >= n,
        timeout, 0.2)
    return time.monotonic() - t0


def _window(stack: Stack, s3: SeaweedS3, seconds: float) -> dict[str, float]:
    """Requests per minute to the API (watch streams aside) and to S3, and reconciles per second."""
    api0, s30 = len(stack.api_requests()), s3.requests()
    rec0 = _metric(stack.metrics, "kubedistill_operator_reconciles_total")
    t0 = time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - t0
    api1, s31 = len(stack.api_requests()), s3.requests()
    rec1 = _metric(stack.metrics, "kubedistill_operator_reconciles_total")
    by_type = {k: round((v - s30.get(k, 0)) * 60 / took) for k, v in s31.items() if v != s30.get(k, 0)}
    return {"api_per_min": (api1 - api0) * 60 / took, "s3_per_min": sum(by_type.values()),
            "s3_per_min_by_type": by_type, "reconciles_per_s": (rec1 - rec0) / took}


def _running(tmp: Path, who: Operator, s3: SeaweedS3, endpoint: str, n: int, a: argparse.Namespace) -> dict[str, Any]:
    bucket = f"kd-scale-{who.label}-{n}"
    s3.create_bucket(bucket)
    docs = [_doc(f"run-{i:04d}", bucket, endpoint) for i in range(n)]
    t0 = time.monotonic()
    _in_parallel(lambda d: _complete(d, lambda s: s == "data", s3.endpoint), docs)
    print(f"  {n} data manifests written in {time.monotonic() - t0:.0f} s", flush=True)
    with _stack(tmp, who, endpoint, a.resync) as stack:
        idle_kb = _memory_kb(stack.op.pid, "VmRSS")
        student = {f"{d['metadata']['name']}-student-crsd" for d in docs}
        cpu0 = stack.cpu()
        t0 = time.monotonic()
        _in_parallel(lambda d: stack.api.call("POST", RUNS, d), docs)
        created = time.monotonic() - t0
        burst = created + _created(stack, n, a.timeout)
        op_cpu, api_cpu = (b - a for a, b in zip(cpu0, stack.cpu(), strict=True))
        have = {j["metadata"]["name"] for j in stack.api.items(JOBS)}
        assert student <= have, f"{len(student - have)} first RayJobs missing"
        print(f"  burst: {n} runs posted in {created:.1f} s, every first RayJob after {burst:.1f} s; CPU meanwhile: "
              f"operator {op_cpu:.1f} s, API server {api_cpu:.1f} s", flush=True)
        _settle(stack, "Running", n, a.timeout)
        steady = _window(stack, s3, a.window)
        sweep = _metric(stack.metrics, "kubedistill_operator_resync_last_sweep_seconds")
        print(f"  running: {steady}; last resync sweep {sweep:.1f} s", flush=True)
        # one run's student finishes: its manifest first (the stage writes it before its job ends), then KubeRay
        doc = docs[n // 2]
        _complete(doc, lambda s: s.startswith("student"), s3.endpoint)
        name = doc["metadata"]["name"]
        t0 = time.monotonic()
        stack.api.call("PATCH", f"{JOBS}/{name}-student-crsd/status", {"status": {
            "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "done"}})
        react = _wait("the next RayJob", lambda: stack.api.get(f"{JOBS}/{name}-evaluate") is not None, 120, 0.05)
        print(f"  reaction: evaluate created {react:.2f} s after the student's RayJob completed", flush=True)
        peak_kb = _memory_kb(stack.op.pid, "VmHWM")
    return {"burst_s": burst, "burst_operator_cpu_s": op_cpu, "burst_api_cpu_s": api_cpu, "idle_mib": idle_kb / 1024, "peak_mib": peak_kb / 1024, "react_s": react,
            "sweep_s": sweep, **{f"running_{k}": v for k, v in steady.items()}}


def _finished(tmp: Path, who: Operator, s3: SeaweedS3, endpoint: str, n: int, a: argparse.Namespace) -> dict[str, Any]:
    bucket = f"kd-done-{who.label}-{n}"
    s3.create_bucket(bucket)
    docs = []
    for i in range(n):
        doc = _doc(f"done-{i:04d}", bucket, endpoint)
        doc["spec"].update(student={"enabled": False}, serving={"enabled": False})
        docs.append(doc)
    _in_parallel(lambda d: _complete(d, lambda s: True, s3.endpoint), docs)
    with _stack(tmp, who, endpoint, a.resync) as stack:
        t0 = time.monotonic()
        _in_parallel(lambda d: stack.api.call("POST", RUNS, d), docs)
        adopt = time.monotonic() - t0 + _settle(stack, "Succeeded", n, a.timeout)
        steady = _window(stack, s3, a.window)
        print(f"  finished: adopted in {adopt:.0f} s; then {steady}", flush=True)
    return {"adopt_s": adopt, **{f"finished_{k}": v for k, v in steady.items()}}


def _unpack(rev: str, tmp: Path) -> Path:
    out = tmp / f"base-{rev}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    where = subprocess.run([sys.executable, "-c", "import kubedistill; print(kubedistill.__file__)"], cwd=out,
                           env={**os.environ, "PYTHONPATH": str(out)}, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(out)), f"the baseline imports {where.stdout.strip()}, not {out}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--window", type=float, default=120.0, help="seconds of each steady state measured")
    p.add_argument("--resync", type=float, default=60.0, help="the candidate's resyncInterval (chart default 300)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="added to each direction of every storage exchange")
    p.add_argument("--baseline", default="cb449c7", help="git revision of the operator to compare with; '' for none")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-finished", action="store_true", help="skip the finished runs (a quicker look)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kd-opscale-"))
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    s3 = SeaweedS3.start(tmp / "seaweed", metrics=True)
    operators = [Operator("candidate")] + ([Operator("baseline", _unpack(a.baseline, tmp))] if a.baseline else [])
    results: dict[str, dict[str, Any]] = {}
    try:
        with _latency(s3, a.delay_ms) as endpoint:
            for n in a.runs:
                for who in operators:
                    print(f"{who.label}, {n} runs:", flush=True)
                    x = _running(tmp, who, s3, endpoint, n, a)
                    if who.base is None and not a.no_finished:
                        x.update(_finished(tmp, who, s3, endpoint, n, a))
                    results[f"{who.label}-{n}"] = x
    finally:
        s3.stop()
    rows: list[benchrecord.Row] = []
    for n in a.runs:
        c, b = results[f"candidate-{n}"], results.get(f"baseline-{n}")

        def vs(k: str, f: str = "{:.1f}", b: dict[str, Any] | None = b) -> str:
            return f" (baseline {f.format(b[k])})" if b else ""

        print(f"\n{n} runs, storage +{2 * a.delay_ms:.0f} ms per round trip:")
        print(f"  every first RayJob after {c['burst_s']:.1f} s{vs('burst_s')}")
        print(f"  running: resync sweep {c['sweep_s']:.1f} s every {a.resync:.0f} s; {c['running_api_per_min']:.0f} API "
              f"and {c['running_s3_per_min']:.0f} S3 requests/min{vs('running_s3_per_min', '{:.0f} S3/min')}")
        print(f"  reaction to a RayJob completing: {c['react_s']:.2f} s{vs('react_s', '{:.2f} s')}")
        if "finished_s3_per_min" in c:
            print(f"  finished: {c['finished_api_per_min']:.1f} API, {c['finished_s3_per_min']:.1f} S3 requests/min")
        print(f"  peak memory {c['peak_mib']:.0f} MiB{vs('peak_mib', '{:.0f} MiB')}")
        if b:
            print(f"  ratios (baseline / candidate): first RayJobs {b['burst_s'] / c['burst_s']:.1f}x, S3 requests "
                  f"while running {b['running_s3_per_min'] / max(c['running_s3_per_min'], 1e-9):.1f}x, "
                  f"reaction {b['react_s'] / c['react_s']:.1f}x")
        base = (f"; baseline `{a.baseline}`: {b['burst_s']:.1f} s, {b['running_s3_per_min']:.0f} S3/min running, "
                f"reaction {b['react_s']:.1f} s, {b['peak_mib']:.0f} MiB") if b else ""
        rows += [
            {"what": f"operator: {n} runs at once, storage +{2 * a.delay_ms:.0f} ms (`operator_scale.py`)",
             "target": "every first RayJob <= 30 s" + ("; peak memory <= 250 MiB" if n >= 1000 else ""),
             "measured": f"{c['burst_s']:.1f} s; peak {c['peak_mib']:.0f} MiB{base}",
             "met": "yes" if c["burst_s"] <= 30 and (n < 1000 or c["peak_mib"] <= 250) else "no"},
            {"what": f"operator: {n} running runs, resync every {a.resync:.0f} s (`operator_scale.py`)",
             "target": "a full sweep <= the resync interval",
             "measured": f"sweep {c['sweep_s']:.1f} s; {c['running_api_per_min']:.0f} API, "
                         f"{c['running_s3_per_min']:.0f} S3 requests/min; a RayJob's completion acted on in "
                         f"{c['react_s']:.2f} s",
             "met": "yes" if c["sweep_s"] <= a.resync else "no"},
        ]
        if "finished_s3_per_min" in c:
            rows.append(
                {"what": f"operator: {n} finished runs, steady state, {a.window:.0f} s (`operator_scale.py`)",
                 "target": "0 storage requests/min",
                 "measured": f"{c['finished_s3_per_min']:.1f} S3, {c['finished_api_per_min']:.1f} API requests/min",
                 "met": "yes" if c["finished_s3_per_min"] == 0 else "no"})
    benchrecord.write("operator_scale", vars(a), results, rows)


if __name__ == "__main__":
    main()
