"""How the operator copes with many DistillationRuns at once.

Against the emulated Kubernetes API (tests/e2e/apiserver.py), the real operator process
(`kopf run operator/handlers.py`) first handles 1 run (the baseline), then N runs created at once
(default 200). Measured: seconds from the creation until every run's first-stage RayJob exists,
and the operator's peak resident memory (VmHWM) and memory before the burst. Nothing executes the
RayJobs: this measures the operator, not Ray.

Then, against a fresh API server and operator: N runs whose stages are already done in (local)
storage. The operator adopts them (Succeeded, no RayJob); measured: its API requests (watch streams
aside) and its storage reads per minute while adopting, and per minute in the steady state after
(the target: none beyond the watch).

    python benchmarks/operator_scale.py [--runs 200] [--interval 10] [--window 60]

Fairness: the baseline (1 run) and the burst go to the same operator process and API server, one after the
other. Writes `benchmarks/records/operator_scale.json`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubedistill import benchrecord  # noqa: E402
from kubedistill.core import pipeline, spec, stage  # noqa: E402
from tests.conftest import free_port, minimal_doc  # noqa: E402
from tests.e2e.kuberay import Api  # noqa: E402

RUNS = "/apis/kubedistill.io/v1alpha1/namespaces/default/distillationruns"


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _doc(name: str, store: Path) -> dict:
    doc = minimal_doc(storage={"uri": str(store)}, teacher={"enabled": False},
                      annotation={"enabled": False}, pruning={"enabled": False})
    doc["metadata"] = {"name": name, "namespace": "default"}
    return doc


def _burst(api: Api, names: list[str], store: Path, timeout: float) -> float:
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: api.call("POST", RUNS, _doc(n, store)), names))
    want = {f"{n}-data" for n in names}
    while time.monotonic() - t0 < timeout:
        have = {j["metadata"]["name"] for j in api.items("/apis/ray.io/v1/rayjobs")}
        if want <= have:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError(f"only {len(want & have)}/{len(want)} first-stage RayJobs after {timeout}s")


@contextlib.contextmanager
def _operator(tmp: Path, interval: float) -> Iterator[tuple[Api, subprocess.Popen, str, Path]]:
    """An emulated API server logging its requests and the real operator against it: (api, operator, metrics
    URL, request log)."""
    port, metrics = free_port(), free_port()
    requests = tmp / f"requests-{port}.log"
    server = subprocess.Popen([sys.executable, "-m", "tests.e2e.apiserver", "--port", str(port), "--log-requests",
                               str(requests)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    kubeconfig = tmp / f"kubeconfig-{port}"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: b\n"
        f"clusters: [{{name: b, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: b, user: {token: b}}]\ncontexts: [{name: b, context: {cluster: b, user: b}}]\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEDISTILL_RECONCILE_INTERVAL": str(interval),
           "KUBEDISTILL_METRICS_PORT": str(metrics)}
    log = open(tmp / f"operator-{port}.log", "w")  # noqa: SIM115 - closed below
    op = subprocess.Popen([sys.executable, "-m", "kopf", "run", "operator/handlers.py", "--all-namespaces",
                           "--standalone", "--quiet"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(5)  # operator start-up (imports, discovery)
        yield Api(f"http://127.0.0.1:{port}"), op, f"http://127.0.0.1:{metrics}/", requests
        assert op.poll() is None, (tmp / f"operator-{port}.log").read_text()[-3000:]
    finally:
        for proc in (op, server):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        print(f"operator log: {log.name}")


def _finished_doc(name: str, store: Path) -> dict:
    doc = minimal_doc(storage={"uri": str(store), "secretRef": {"name": "s3-credentials"}},
                      teacher={"enabled": False}, annotation={"enabled": False}, pruning={"enabled": False},
                      student={"enabled": False}, serving={"enabled": False})
    doc["metadata"] = {"name": name, "namespace": "default"}
    for s in pipeline.build(spec.parse_run(doc)):  # every stage done: what a finished run leaves in storage
        stage.execute(stage.StageContext(s.config, stage.run_storage(s.config)),
                      lambda ctx: {"metrics": {"gate": {"candidate": "baseline", "passed": True, "reason": "ok"}}})
    return doc


def _counts(metrics: str, requests: Path) -> tuple[list[str], float]:
    """(API requests so far, watch streams aside; manifests read from storage so far)."""
    lines = [x for x in requests.read_text().splitlines() if "watch=" not in x]
    text = urllib.request.urlopen(metrics, timeout=10).read().decode()
    found = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("kubedistill_operator_storage_reads_total")]
    reads = found[0] if found else float("nan")  # an operator from before the counter
    return lines, reads


def _kinds(lines: list[str]) -> str:
    """Requests by method and resource (object names left out), most frequent first."""
    kinds = collections.Counter(" ".join(x.split("?")[0].split("/")[:-1]) if x.count("/") > 5 else x for x in lines)
    return ", ".join(f"{n}× {k}" for k, n in kinds.most_common(5)) or "none"


def _steady_state(tmp: Path, runs: int, interval: float, window: float, timeout: float) -> dict[str, float]:
    docs = [_finished_doc(f"done-{i:03d}", tmp / "store") for i in range(runs)]
    with _operator(tmp, interval) as (api, _, metrics, requests):
        api.call("POST", "/api/v1/namespaces/default/secrets", {  # each reconcile reads it: an API call per run
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials", "namespace": "default",
                                                  "labels": {"kubedistill.io/storage-credentials": "true"}},
            "data": {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}})
        api_0, reads_0 = _counts(metrics, requests)
        mine = len(api_0)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda d: api.call("POST", RUNS, d), docs))
        while sum((r.get("status") or {}).get("phase") == "Succeeded" for r in api.items(RUNS)) < runs:
            mine += 1  # this loop's own GET
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the finished runs were not all Succeeded after {timeout}s")
            time.sleep(1)
        # settled: no request for two intervals (kopf's own retries of patches that raced ours end too)
        settle_0, last = time.monotonic(), -1
        while time.monotonic() - settle_0 < max(150.0, 10 * interval):
            seen = len(_counts(metrics, requests)[0])
            if seen == last:
                break
            last = seen
            time.sleep(2 * interval)
        adopt_s = time.monotonic() - t0
        api_1, reads_1 = _counts(metrics, requests)
        time.sleep(window)
        api_2, reads_2 = _counts(metrics, requests)
    per_min = 60.0 / window
    steady = api_2[len(api_1):]
    return {"adopt_s": adopt_s, "adopt_api": len(api_1) - mine - runs - 1, "adopt_reads": reads_1 - reads_0,
            "steady_api_per_min": len(steady) * per_min, "steady_reads_per_min": (reads_2 - reads_1) * per_min,
            "steady_kinds": _kinds(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--interval", type=float, default=10.0, help="the operator's reconcile interval (chart default 10)")
    p.add_argument("--window", type=float, default=60.0, help="seconds of steady state measured")
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kd-opscale-"))
    with _operator(tmp, a.interval) as (api, op, _, _):
        one = _burst(api, ["base-0"], tmp / "burst", a.timeout)
        idle_kb = _memory_kb(op.pid, "VmRSS")
        many = _burst(api, [f"run-{i:03d}" for i in range(a.runs)], tmp / "burst", a.timeout)
        peak_kb = _memory_kb(op.pid, "VmHWM")
    print(f"1 run:    first-stage RayJob after {one:.2f} s")
    print(f"{a.runs} runs: every first-stage RayJob after {many:.2f} s "
          f"({many / one:.1f}x the single run's time for {a.runs}x the runs; {a.runs / many:.1f} runs/s)")
    print(f"operator memory: {idle_kb / 1024:.0f} MiB after 1 run, peak {peak_kb / 1024:.0f} MiB with {a.runs + 1} runs")
    x = _steady_state(tmp, a.runs, a.interval, a.window, a.timeout)
    adopt_min = x["adopt_s"] / 60
    print(f"{a.runs} finished runs adopted in {x['adopt_s']:.0f} s: {x['adopt_api']} API requests "
          f"({x['adopt_api'] / adopt_min:.0f}/min), {x['adopt_reads']:.0f} storage reads ({x['adopt_reads'] / adopt_min:.0f}/min)")
    print(f"steady state, {a.runs} finished runs, {a.window:.0f} s: {x['steady_api_per_min']:.1f} API requests/min "
          f"beyond the watch streams, {x['steady_reads_per_min']:.1f} storage reads/min ({x['steady_kinds']})")
    peak = peak_kb / 1024
    rows: list[benchrecord.Row] = [
        {"what": f"operator: {a.runs} runs at once (`operator_scale.py`)",
         "target": "all first stages created; peak memory <= 200 MiB",
         "measured": f"all {a.runs} created in {many:.1f} s (1 run alone: {one:.2f} s); peak {peak:.0f} MiB",
         "met": "yes" if peak <= 200 else "no"},
        {"what": f"operator: {a.runs} finished runs, steady state, {a.window:.0f} s (`operator_scale.py`)",
         "target": "no API or storage call beyond the watch",
         "measured": f"{x['steady_api_per_min']:.1f} API requests/min, {x['steady_reads_per_min']:.1f} storage reads/min",
         "met": "yes" if x["steady_api_per_min"] == 0 and x["steady_reads_per_min"] == 0 else "no"},
    ]
    benchrecord.write("operator_scale", vars(a), {
        "one_run_s": one, "burst_s": many, "idle_mib": idle_kb / 1024, "peak_mib": peak, **x}, rows)


if __name__ == "__main__":
    main()
