"""kopf wiring for DistillationRun: every decision is in kubedistill.cluster.reconcile, every API and storage
call in kubedistill.cluster.controller, the queue in kubedistill.cluster.workqueue.
Run: python operator/run.py --all-namespaces [--standalone | --peering kubedistill] (`kopf run` of this file,
with the official Kubernetes client refused before kopf loads it)

A run is reconciled when it, or one of its RayJobs or its RayService, changes (kopf's watches), when a timer
it asked for ends (a stage's retry backoff, a blocked run's next try, a running stage's next progress read),
and at each resync; never on a
short timer per run. The reconciles run in a pool of threads of their own, off kopf's.

Environment: KUBEDISTILL_RESYNC_INTERVAL (seconds between two resyncs, when every run is reconciled with
its manifests read again; default 300), KUBEDISTILL_RETRY_INTERVAL (seconds before a run blocked on its
storage, Secret, KubeRay or the operator's rights is tried again; default 10), KUBEDISTILL_PROGRESS_INTERVAL
(seconds between two reads of a running stage's progress into the run's status; default 30), KUBEDISTILL_WORKERS
(reconciles at once; default 16), KUBEDISTILL_METRICS_PORT (Prometheus metrics, default 9090; 0 turns them
off), KUBEDISTILL_STAGE_IMAGE and KUBEDISTILL_STAGE_IMAGE_GPU (what stage pods run when a run sets no
spec.ray.image; the chart sets both), and the security settings of
`kubedistill.cluster.security.Settings.from_env` (allowed endpoints, NetworkPolicy peers).
"""

import asyncio
import logging
import os

import kopf
import prometheus_client

from kubedistill.cluster import controller, k8s, security
from kubedistill.cluster.workqueue import Why, Workers
from kubedistill.core import spec, stage

RESYNC = float(os.environ.get("KUBEDISTILL_RESYNC_INTERVAL", "300"))
RETRY = float(os.environ.get("KUBEDISTILL_RETRY_INTERVAL", "10"))
PROGRESS = float(os.environ.get("KUBEDISTILL_PROGRESS_INTERVAL", "30"))
WORKERS = int(os.environ.get("KUBEDISTILL_WORKERS", "16"))
RUNS = (spec.API_GROUP, spec.API_VERSION, controller.RUN_PLURAL)
CHILD = {"labels": {f"{k8s.GROUP}/run": kopf.PRESENT}}
workers: Workers | None = None
ctl: controller.Controller | None = None


# kopf's indexes, kept current by its watches and filled before any handler runs (so a restarted operator
# sees every child it created before): each run, and the children of each run, by (namespace, run)
@kopf.index(*RUNS, id="runs")
def _runs(body: kopf.Body, namespace: str | None, name: str, **_) -> dict:
    return {(namespace or "default", name): controller.slim(dict(body))}


@kopf.index(controller.RAY_GROUP, controller.RAY_VERSION, "rayjobs", id="rayjobs", **CHILD)
@kopf.index(controller.RAY_GROUP, controller.RAY_VERSION, "rayservices", id="rayservices", **CHILD)
def _children(body: kopf.Body, **_) -> dict:
    key = controller.child_key(dict(body))
    return {key: controller.slim(dict(body))} if key else {}


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    """kopf's own readers of the service account and kubeconfig (as `kubeapi.Connection.find`): without this,
    kopf logs in through the official client, whose import alone costs the process about 52 MiB."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start(
    settings: kopf.OperatorSettings, runs: kopf.Index, rayjobs: kopf.Index, rayservices: kopf.Index, **_
) -> None:
    global workers, ctl
    settings.posting.level = logging.WARNING  # our own events say what happened; kopf posts only its errors
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not a line per watch event: its warnings only
    ctl = controller.Controller(
        controller.Cluster.connect(WORKERS),
        controller.images_from_env(os.environ),
        security.Settings.from_env(os.environ),
        retry_seconds=RETRY,
        progress_seconds=PROGRESS,
    )

    def take(key: tuple[str, str]) -> tuple[dict, dict] | None:  # in the event loop, where kopf writes the indexes
        body = next(iter(runs.get(key, [])), None)
        kids = {"RayJob": list(rayjobs.get(key, [])), "RayService": list(rayservices.get(key, []))}
        return (body, controller.children_by_name(kids)) if body is not None else None

    def sync(key: tuple[str, str], snapshot: tuple[dict, dict] | None, why: Why) -> float | None:
        if snapshot is None:  # deleted: its RayJobs and RayService go with it (they carry its owner reference)
            ctl.forget_key(f"{key[0]}/{key[1]}")
            return None
        return ctl.sync(*snapshot, stage.now(), why)

    workers = Workers(
        take, sync, lambda: list(runs), workers=WORKERS, resync=RESYNC, retry=RETRY, on_sweep_start=ctl.begin_sweep
    )
    await workers.start()
    if port := int(os.environ.get("KUBEDISTILL_METRICS_PORT", "9090")):
        prometheus_client.start_http_server(port)


@kopf.on.cleanup()
async def stop(**_) -> None:
    if workers is not None:
        await workers.stop()
    if ctl is not None:  # the last reports, before the process goes
        await asyncio.to_thread(ctl.reports.flush, 30)


@kopf.on.event(*RUNS)
async def run_changed(namespace: str | None, name: str, **_) -> None:
    assert workers is not None, "set at start-up"
    workers.add((namespace or "default", name))


@kopf.on.event(controller.RAY_GROUP, controller.RAY_VERSION, "rayjobs", **CHILD)
@kopf.on.event(controller.RAY_GROUP, controller.RAY_VERSION, "rayservices", **CHILD)
async def child_changed(body: kopf.Body, **_) -> None:
    assert workers is not None, "set at start-up"
    workers.add(controller.child_key(dict(body)))
