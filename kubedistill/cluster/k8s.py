"""Pure builders of the KubeRay objects a DistillationRun becomes, and their status → stage phase.

Nothing here talks to a cluster: the operator (and `kubedistill render`) call these functions and
apply what they return. Every object validates against KubeRay v1.7.0's CRD schemas (tests check it).

Names are deterministic and at most 47 characters (KubeRay derives pod and service names from
them): `<run>-<stage>`, cut and suffixed with a hash of the full name when too long.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import yaml

from kubedistill import __version__
from kubedistill.core import pipeline
from kubedistill.core.pipeline import Stage
from kubedistill.core.serve_app import APP_NAME, IMPORT_PATH, app_args
from kubedistill.core.spec import API_GROUP, KIND, DistillationRun, StagePhase, to_wire
from kubedistill.core.spec import API_VERSION as VERSION
from kubedistill.core.stage import CONFIG_ENV, run_prefix

GROUP = API_GROUP  # also the prefix of our labels and annotations
API_VERSION = f"{GROUP}/{VERSION}"
MAX_NAME = 47
ATTEMPT = f"{GROUP}/attempt"
#: digest of the input manifests a RayJob was created for
INPUTS = f"{GROUP}/inputs"
SERVE_PORT = 8000
#: where this project's images are published (the Dockerfile's builds)
IMAGE_REPOSITORY = "ghcr.io/kubedistill/kubedistill"


def child_name(run_name: str, stage: str) -> str:
    """`<run>-<stage>`, or its first characters plus a hash when longer than 47 (DNS-1035 safe)."""
    full = f"{run_name}-{stage}".lower()
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[: MAX_NAME - 9].rstrip('-')}-{digest}"


def labels(run_name: str, stage: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "kubedistill", f"{GROUP}/run": run_name, f"{GROUP}/stage": stage}


def metadata(run: DistillationRun, stage: str, uid: str | None) -> dict[str, Any]:
    """Name, namespace, labels and, when the run's uid is known, the owner reference (children go with the run)."""
    meta: dict[str, Any] = {"name": child_name(run.name, stage), "labels": labels(run.name, stage)}
    if run.metadata.namespace:
        meta["namespace"] = run.metadata.namespace
    if uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": run.name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


@dataclass(frozen=True)
class Images:
    """What stage pods run when a run sets no `spec.ray.image`: the operator's own image (the chart passes
    it, see `controller.images_from_env`) and its GPU variant, for stages with GPUs."""

    cpu: str
    gpu: str

    @classmethod
    def release(cls) -> Images:
        """This release's images (the Dockerfile's builds): what `kubedistill render` shows."""
        return cls(f"{IMAGE_REPOSITORY}:{__version__}", f"{IMAGE_REPOSITORY}:{__version__}-gpu")

    def of(self, run: DistillationRun, gpus: float) -> str:
        return run.spec.ray.image or (self.gpu if gpus else self.cpu)


def _container(
    run: DistillationRun,
    image: str,
    name: str,
    cpus: float,
    gpus: float,
    memory: str | None,
    ports: list[tuple[str, int]],
) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": _quantity(cpus)}
    if memory:
        requests["memory"] = memory
    limits = dict(requests)
    if gpus:
        limits["nvidia.com/gpu"] = max(1, math.ceil(gpus))
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    if run.spec.storage.secret_ref:
        c["envFrom"] = [{"secretRef": {"name": run.spec.storage.secret_ref.name}}]
    return c


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(cpus * 1000)}m"


def ray_cluster_spec(
    run: DistillationRun,
    group: str,
    workers: int,
    min_workers: int,
    max_workers: int,
    cpus: float,
    gpus: float,
    memory: str | None,
    head_ports: list[tuple[str, int]],
    images: Images,
) -> dict[str, Any]:
    """A RayCluster spec: a head that runs no tasks (num-cpus 0) and one worker group sized for the stage.
    Head and workers run one image (Ray needs the same build on both): the GPU variant when workers have GPUs."""
    image = images.of(run, gpus)
    head = _container(
        run, image, "ray-head", 1, 0, "4Gi", [("gcs", 6379), ("dashboard", 8265), ("client", 10001), *head_ports]
    )
    worker = _container(run, image, "ray-worker", cpus, gpus, memory, [])
    start = {"num-cpus": str(max(1, math.ceil(cpus)))}  # Ray's resource view of the pod
    if gpus:
        start["num-gpus"] = str(max(1, math.ceil(gpus)))
    return {
        "rayVersion": run.spec.ray.ray_version,
        "enableInTreeAutoscaling": max_workers > min_workers,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head]}},
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": workers,
                "minReplicas": min_workers,
                "maxReplicas": max_workers,
                "rayStartParams": start,
                "template": {"spec": {"containers": [worker]}},
            }
        ],
    }


# ---------------------------------------------------------------------------------------------
# Batch stages: one RayJob each


def rayjob(
    run: DistillationRun,
    stage: Stage,
    uid: str | None = None,
    attempt: int = 1,
    inputs: str | None = None,
    images: Images | None = None,
) -> dict[str, Any]:
    """The RayJob of one batch stage: its entrypoint, its config as JSON in an env var, a cluster sized for it.

    `backoffLimit` is 0: the operator owns retries (with backoff, events and the attempt in the stage's
    status), so KubeRay must not retry as well. Each attempt is a new RayJob annotated with its number and
    with the digest of the input manifests it was created for.
    """
    r = stage.resources
    lo, hi = stage.workers  # an autoscaled stage's workers come and go within its registry entry's range
    workers = max(1, lo)
    meta = metadata(run, stage.name, uid)
    meta["annotations"] = {f"{GROUP}/config-hash": stage.config_hash, ATTEMPT: str(attempt)}
    if inputs is not None:  # the inputs it runs on (`policy.inputs_key`): a rebuilt input makes it stale
        meta["annotations"][INPUTS] = inputs
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            "entrypoint": stage.entrypoint,  # fixed text: user strings travel only in the env var below
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {CONFIG_ENV: stage.config_json}}),
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "activeDeadlineSeconds": run.spec.ray.stage_timeout_seconds,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "rayClusterSpec": ray_cluster_spec(
                run,
                "workers",
                workers,
                lo,
                hi,
                r.cpus_per_worker,
                r.gpus_per_worker,
                r.memory,
                head_ports=[],
                images=images or Images.release(),
            ),
        },
    }


def rayjob_phase(obj: dict[str, Any]) -> tuple[StagePhase, str | None]:
    """(stage phase, message) of a RayJob: Succeeded only when Complete and SUCCEEDED."""
    status = obj.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus"), status.get("jobStatus")
    if deployment == "Complete" and job == "SUCCEEDED":
        return "Succeeded", None
    if deployment == "Failed" or job in ("FAILED", "STOPPED"):
        reason = status.get("reason")
        return "Failed", status.get("message") or (f"{reason}" if reason else f"job {job or deployment}")
    return "Running", job or deployment or "waiting for KubeRay"


# ---------------------------------------------------------------------------------------------
# Serving: the student as a RayService


def serve_config(run: DistillationRun, model_uri: str) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2) for the student: the same app and args a local run deploys."""
    s = run.spec
    args = app_args(s.serving, model_uri, s.storage.endpoint, s.storage.region)
    return {
        "applications": [
            {
                "name": APP_NAME,
                "import_path": IMPORT_PATH,
                "route_prefix": "/",
                "args": args.model_dump(by_alias=True, exclude_none=True),
            }
        ]
    }


def rayservice(
    run: DistillationRun, model_uri: str, uid: str | None = None, images: Images | None = None
) -> dict[str, Any]:
    """The RayService hosting the student: one worker per Serve replica, autoscaled within spec.serving.replicas."""
    s = run.spec.serving
    images = images or Images.release()
    meta = metadata(run, "serve", uid)
    config = serve_config(run, model_uri)
    what = [config, to_wire(run.spec.ray), images.of(run, s.gpus_per_replica)]  # a new image rolls the service too
    meta["annotations"] = {f"{GROUP}/config-hash": hashlib.sha256(yaml.safe_dump(what).encode()).hexdigest()[:16]}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(
                run,
                "serve",
                workers=max(1, s.replicas.min),
                min_workers=max(1, s.replicas.min),
                max_workers=s.replicas.max,
                cpus=s.cpus_per_replica,
                gpus=s.gpus_per_replica,
                memory=None,
                head_ports=[("serve", SERVE_PORT)],
                images=images,
            ),
        },
    }


def student_model_uri(run: DistillationRun) -> str:
    """What `render` shows for the served model: the operator fills in the version the gate promoted
    (`<stage>/v-<version>/model`), which exists only once the run has trained and evaluated it."""
    return f"{run_prefix(run.spec.storage.uri, run.name)}/student-crsd/v-PROMOTED/model"


def render(run: DistillationRun, uid: str | None = None, images: Images | None = None) -> list[dict[str, Any]]:
    """Every RayJob and the RayService the operator creates for `run`, in stage order."""
    out = []
    for stage in pipeline.build(run):
        out.append(
            rayservice(run, student_model_uri(run), uid, images)
            if stage.service
            else rayjob(run, stage, uid, images=images)
        )
    return out


def rayservice_phase(obj: dict[str, Any]) -> tuple[StagePhase, str | None]:
    """(stage phase, message) of a RayService: Succeeded once Ready, Failed if the app failed to deploy."""
    status = obj.get("status") or {}
    app = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(APP_NAME) or {}
    pending = ((status.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}).get(APP_NAME) or {}
    for a in (pending, app):
        if a.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            return "Failed", f"application {APP_NAME} {a['status']}: {a.get('message') or 'no message'}"
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready and ready.get("status") == "True":
        return "Succeeded", None
    return "Running", (ready or {}).get("message") or app.get("status") or "waiting for the RayService"
