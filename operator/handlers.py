"""kopf wiring for DistillationRun: every decision is in kubedistill.cluster.reconcile, every API call in
kubedistill.cluster.controller. Run: kopf run operator/handlers.py --all-namespaces [--standalone | --peering kubedistill]

Environment: KUBEDISTILL_RECONCILE_INTERVAL (seconds between reconciles of a run, default 10),
KUBEDISTILL_METRICS_PORT (Prometheus metrics, default 9090; 0 turns them off), KUBEDISTILL_STAGE_IMAGE and
KUBEDISTILL_STAGE_IMAGE_GPU (what stage pods run when a run sets no spec.ray.image; the chart sets both), and the
security settings of `kubedistill.cluster.security.Settings.from_env` (allowed endpoints, NetworkPolicy peers).
"""

import logging
import os
import sys

# Nothing the operator does needs numpy, but pyarrow (whose S3 filesystem reads the stage manifests, as the
# stages write them) imports it when it is installed: about 30 MiB per operator process. pyarrow runs
# without it (an optional dependency since pyarrow 16), so the operator's process refuses it.
sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]  # None marks a module as not importable

import kopf
import prometheus_client

from kubedistill.cluster import controller, k8s, security
from kubedistill.core import spec, stage

INTERVAL = float(os.environ.get("KUBEDISTILL_RECONCILE_INTERVAL", "10"))
RUNS = (spec.API_GROUP, spec.API_VERSION, "distillationruns")
STATUS_KEYS = ("phase", "currentStage", "observedGeneration", "stages", "conditions")
ctl: controller.Controller | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    global ctl
    # progress and the last-handled spec go to annotations: .status stays the documented shape
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=k8s.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=k8s.GROUP, key="last-spec")
    settings.persistence.finalizer = f"{k8s.GROUP}/operator"
    settings.posting.level = logging.WARNING  # our own events say what happened; kopf posts only its errors
    ctl = controller.Controller(
        controller.Cluster.connect(), controller.images_from_env(os.environ), security.Settings.from_env(os.environ)
    )
    if port := int(os.environ.get("KUBEDISTILL_METRICS_PORT", "9090")):
        prometheus_client.start_http_server(port)


# every RayJob/RayService the operator created, by (namespace, run): kept current by watches
def _index(body: kopf.Body, **_) -> dict:
    key = controller.child_key(dict(body))
    return {key: dict(body)} if key else {}


rayjobs = kopf.index(controller.RAY_GROUP, controller.RAY_VERSION, "rayjobs", id="rayjobs")(_index)
rayservices = kopf.index(controller.RAY_GROUP, controller.RAY_VERSION, "rayservices", id="rayservices")(_index)


@kopf.timer(*RUNS, interval=INTERVAL, id="reconcile")
def reconcile(body: kopf.Body, patch: kopf.Patch, rayjobs: kopf.Index, rayservices: kopf.Index, **_) -> None:
    key = (body.metadata.namespace or "default", body.metadata.name)
    children = controller.children_by_name({"RayJob": rayjobs.get(key, []), "RayService": rayservices.get(key, [])})
    assert ctl is not None, "set at start-up"
    plan = ctl.reconcile_run(dict(body), children, stage.now())
    if plan is None:  # a finished run nothing has touched since: no API or storage call
        return
    wire = spec.to_wire(plan.status)
    new = {k: wire.get(k) for k in STATUS_KEYS}
    if new != {k: (body.get("status") or {}).get(k) for k in STATUS_KEYS}:  # no write when nothing changed
        patch.status.update(new)
    for type_, reason, message in plan.events:
        kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.delete(*RUNS, optional=True)
def forget(body: kopf.Body, **_) -> None:
    assert ctl is not None, "set at start-up"
    ctl.forget(dict(body))  # its RayJobs and RayService go with it: they carry its owner reference
