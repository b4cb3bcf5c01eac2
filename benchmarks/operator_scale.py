"""How the operator copes with many DistillationRuns at once.

Against the emulated Kubernetes API (tests/e2e/apiserver.py), the real operator process
(`kopf run operator/handlers.py`) first handles 1 run (the baseline), then N runs created at once
(default 200). Measured: seconds from the creation until every run's first-stage RayJob exists,
and the operator's peak resident memory (VmHWM) and memory before the burst. Nothing executes the
RayJobs: this measures the operator, not Ray.

    python benchmarks/operator_scale.py [--runs 200] [--interval 10]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, minimal_doc  # noqa: E402
from tests.e2e.kuberay import Api  # noqa: E402

RUNS = "/apis/kubedistill.io/v1alpha1/namespaces/default/distillationruns"


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _doc(name: str) -> dict:
    doc = minimal_doc(storage={"uri": f"s3://bench/{name}"}, teacher={"enabled": False},
                      annotation={"enabled": False}, pruning={"enabled": False})
    doc["metadata"] = {"name": name, "namespace": "default"}
    return doc


def _burst(api: Api, names: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: api.call("POST", RUNS, _doc(n)), names))
    want = {f"{n}-data" for n in names}
    while time.monotonic() - t0 < timeout:
        have = {j["metadata"]["name"] for j in api.items("/apis/ray.io/v1/rayjobs")}
        if want <= have:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError(f"only {len(want & have)}/{len(want)} first-stage RayJobs after {timeout}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--interval", type=float, default=10.0, help="the operator's reconcile interval (chart default 10)")
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="kd-opscale-"))
    server = subprocess.Popen([sys.executable, "-m", "tests.e2e.apiserver", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout.readline().strip() == "ready"
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: b\n"
        f"clusters: [{{name: b, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: b, user: {token: b}}]\ncontexts: [{name: b, context: {cluster: b, user: b}}]\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEDISTILL_RECONCILE_INTERVAL": str(a.interval),
           "KUBEDISTILL_METRICS_PORT": "0"}
    log = open(tmp / "operator.log", "w")
    op = subprocess.Popen([sys.executable, "-m", "kopf", "run", "operator/handlers.py", "--all-namespaces",
                           "--standalone", "--quiet"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}")
    try:
        time.sleep(5)  # operator start-up (imports, discovery)
        one = _burst(api, ["base-0"], a.timeout)
        idle_kb = _memory_kb(op.pid, "VmRSS")
        many = _burst(api, [f"run-{i:03d}" for i in range(a.runs)], a.timeout)
        peak_kb = _memory_kb(op.pid, "VmHWM")
        assert op.poll() is None, (tmp / "operator.log").read_text()[-3000:]
    finally:
        for proc in (op, server):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"operator log: {tmp / 'operator.log'}")
    print(f"1 run:    first-stage RayJob after {one:.2f} s")
    print(f"{a.runs} runs: every first-stage RayJob after {many:.2f} s "
          f"({many / one:.1f}x the single run's time for {a.runs}x the runs; {a.runs / many:.1f} runs/s)")
    print(f"operator memory: {idle_kb / 1024:.0f} MiB after 1 run, peak {peak_kb / 1024:.0f} MiB with {a.runs + 1} runs")


if __name__ == "__main__":
    main()
