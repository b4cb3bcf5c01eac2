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
from kubedistill.cluster.security import CREDENTIAL_KEYS, OPTIONAL_CREDENTIAL_KEYS, Settings
from kubedistill.core import pipeline
from kubedistill.core.memory import default_memory
from kubedistill.core.pipeline import Stage
from kubedistill.core.serve_app import APP_NAME, IMPORT_PATH, app_args
from kubedistill.core.spec import API_GROUP, KIND, DistillationRun, StagePhase, to_wire
from kubedistill.core.spec import API_VERSION as VERSION
from kubedistill.core.stage import CONFIG_ENV, JOB_ENV, run_prefix

GROUP = API_GROUP  # also the prefix of our labels and annotations
#: Kueue's labels on a job: the LocalQueue it waits in, and its WorkloadPriorityClass
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
API_VERSION = f"{GROUP}/{VERSION}"
MAX_NAME = 47
ATTEMPT = f"{GROUP}/attempt"
#: digest of the input manifests a RayJob was created for
INPUTS = f"{GROUP}/inputs"
SERVE_PORT = 8000
#: where KubeRay has Ray export its metrics in every Ray pod (its default `metrics-export-port`, port `metrics`)
METRICS_PORT = 8080
#: the head's Ray ports: GCS, dashboard and Jobs API, Ray client
RAY_PORTS = (("gcs", 6379), ("dashboard", 8265), ("client", 10001))
#: the key of the Ray token in the per-run Secret (what KubeRay's `authOptions.secretName` expects)
TOKEN_KEY = "auth_token"
#: the user (and group) of this project's images (the Dockerfile runs as Ray's `ray` user)
RUN_AS_USER, RUN_AS_GROUP = 1000, 100
#: the `restricted` Pod Security Standard, as every pod the operator creates carries it
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_GROUP,
    "fsGroup": RUN_AS_GROUP,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
#: memory of a Ray head (GCS, dashboard; it runs no tasks) and of KubeRay's helper containers
HEAD_MEMORY, HELPER_MEMORY = "4Gi", "512Mi"
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


def credentials_env(run: DistillationRun) -> list[dict[str, Any]]:
    """The storage credentials as single keys of the run's Secret (`secretKeyRef`), never the whole Secret."""
    ref = run.spec.storage.secret_ref
    if ref is None:
        return []
    keys = [(k, False) for k in CREDENTIAL_KEYS] + [(k, True) for k in OPTIONAL_CREDENTIAL_KEYS]
    return [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": k, **({"optional": True} if o else {})}}}
        for k, o in keys
    ]


def _container(
    run: DistillationRun,
    image: str,
    name: str,
    cpus: float,
    gpus: float,
    memory: str | None,
    ports: list[tuple[str, int]],
) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": _quantity(cpus), "memory": memory or default_memory(cpus)}
    limits = dict(requests)
    if gpus:
        limits["nvidia.com/gpu"] = max(1, math.ceil(gpus))
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": dict(CONTAINER_SECURITY),
    }
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    if env := credentials_env(run):
        c["env"] = env
    return c


def pod_template(run: DistillationRun, stage: str, container: dict[str, Any], token: bool = False) -> dict[str, Any]:
    """A pod template: the run's labels (its NetworkPolicy selects them), the `restricted` security context,
    and no service-account token unless the pod talks to the API server (`token`: the autoscaler's head)."""
    return {
        "metadata": {"labels": labels(run.name, stage)},
        "spec": {
            "automountServiceAccountToken": token,
            "securityContext": dict(POD_SECURITY),
            "containers": [container],
        },
    }


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(cpus * 1000)}m"


def token_secret_name(run_name: str) -> str:
    return child_name(run_name, "ray-token")


def token_secret(run: DistillationRun, token: str, uid: str | None = None) -> dict[str, Any]:
    """The Secret holding the token every Ray cluster of the run requires (KubeRay's `authOptions`): the operator
    creates it once per run, with a random token, owned by the run (it goes when the run goes)."""
    meta = metadata(run, "ray-token", uid)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "stringData": {TOKEN_KEY: token}}


def network_policy(run: DistillationRun, settings: Settings, uid: str | None = None) -> dict[str, Any]:
    """The run's NetworkPolicy: its Ray pods admit each other on every port (Ray's nodes talk on many), the
    operator and KubeRay on the head's Ray ports, the Serve port only from `settings.serving_from`
    (the chart's `serving.allowedFrom`), the metrics port only from `settings.metrics_from` (its
    `monitoring.scrapeFrom`: Prometheus); nothing else reaches them."""
    own = {"matchLabels": {f"{GROUP}/run": run.name}}
    tcp = [{"protocol": "TCP", "port": p} for _, p in RAY_PORTS]
    ingress: list[dict[str, Any]] = [
        {"from": [{"podSelector": own}]},
        {"from": [settings.operator_peer, settings.kuberay_peer], "ports": tcp},
    ]
    if run.spec.serving.enabled and settings.serving_from:
        ingress.append({"from": list(settings.serving_from), "ports": [{"protocol": "TCP", "port": SERVE_PORT}]})
    if settings.metrics_from:
        ingress.append({"from": list(settings.metrics_from), "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(run, "ray", uid),
        "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": ingress},
    }


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
    head = _container(run, image, "ray-head", 1, 0, HEAD_MEMORY, [*RAY_PORTS, *head_ports])
    worker = _container(run, image, "ray-worker", cpus, gpus, memory, [])
    start = {"num-cpus": str(max(1, math.ceil(cpus)))}  # Ray's resource view of the pod
    if gpus:
        start["num-gpus"] = str(max(1, math.ceil(gpus)))
    autoscaled = max_workers > min_workers
    spec: dict[str, Any] = {
        "rayVersion": run.spec.ray.ray_version,
        # every Ray endpoint (GCS, dashboard, Jobs API, client) requires the run's token; KubeRay gives it to
        # the Ray containers and its own clients from this Secret, which the operator creates per run
        "authOptions": {"mode": "token", "secretName": token_secret_name(run.name)},
        "enableInTreeAutoscaling": autoscaled,
        "headGroupSpec": {
            # the dashboard listens beyond localhost for KubeRay and the job submitter; the token and the run's
            # NetworkPolicy keep everyone else out
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            # the autoscaler (a container KubeRay adds to the head) talks to the API server: only it needs a token
            "template": pod_template(run, group, head, token=autoscaled),
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": workers,
                "minReplicas": min_workers,
                "maxReplicas": max_workers,
                "rayStartParams": start,
                "template": pod_template(run, group, worker),
            }
        ],
    }
    if autoscaled:
        spec["autoscalerOptions"] = {"securityContext": dict(CONTAINER_SECURITY), "resources": _helper_resources()}
    return spec


def _helper_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "200m", "memory": HELPER_MEMORY}, "limits": {"memory": HELPER_MEMORY}}


def submitter_template(run: DistillationRun, stage: str, image: str) -> dict[str, Any]:
    """The pod that submits a RayJob's entrypoint (KubeRay fills in its command): restricted like the rest."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "resources": _helper_resources(),
        "securityContext": dict(CONTAINER_SECURITY),
    }
    template = pod_template(run, stage, container)
    template["spec"]["restartPolicy"] = "Never"
    return template


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
    queued = kueue_labels(run)
    meta["labels"].update(queued)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            # queued: created suspended, as Kueue expects; Kueue unsuspends it when its LocalQueue admits it
            **({"suspend": True} if queued else {}),
            "entrypoint": stage.entrypoint,  # fixed text: user strings travel only in the env var below
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {**JOB_ENV, CONFIG_ENV: stage.config_json}}),
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "activeDeadlineSeconds": run.spec.ray.stage_timeout_seconds,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "submitterPodTemplate": submitter_template(run, stage.name, (images or Images.release()).of(run, 0)),
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


def kueue_labels(run: DistillationRun) -> dict[str, str]:
    """The labels that put a RayJob on the run's Kueue LocalQueue (`spec.ray.queueName`) with its priority."""
    r = run.spec.ray
    if not r.queue_name:
        return {}
    return {QUEUE_LABEL: r.queue_name, **({PRIORITY_LABEL: r.priority_class_name} if r.priority_class_name else {})}


def rayjob_phase(obj: dict[str, Any]) -> tuple[StagePhase, str | None]:
    """(stage phase, message) of a RayJob: Succeeded only when Complete and SUCCEEDED; Queued while suspended
    (waiting for Kueue to admit it, or preempted by it: KubeRay then deletes its cluster and waits)."""
    status = obj.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus"), status.get("jobStatus")
    if deployment == "Complete" and job == "SUCCEEDED":
        return "Succeeded", None
    if deployment in ("Failed", "ValidationFailed") or job in ("FAILED", "STOPPED"):
        reason = status.get("reason")
        return "Failed", status.get("message") or (f"{reason}" if reason else f"job {job or deployment}")
    suspended = (obj.get("spec") or {}).get("suspend") is True
    if deployment in ("Suspended", "Suspending") or (suspended and deployment in (None, "", "New")):
        queue = ((obj.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
        return "Queued", f"waiting for Kueue to admit it to LocalQueue {queue}" if queue else "suspended"
    return "Running", job or deployment or "waiting for KubeRay"


# ---------------------------------------------------------------------------------------------
# Serving: the student as a RayService


def serve_config(run: DistillationRun, model_uri: str, runtime: str) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2) for the student: the same app and args a local run deploys."""
    s = run.spec
    args = app_args(s.serving, model_uri, runtime, s.storage.endpoint, s.storage.region)
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
    run: DistillationRun,
    model_uri: str,
    runtime: str,
    uid: str | None = None,
    images: Images | None = None,
) -> dict[str, Any]:
    """The RayService hosting the student: one worker per Serve replica, autoscaled within spec.serving.replicas."""
    s = run.spec.serving
    images = images or Images.release()
    meta = metadata(run, "serve", uid)
    config = serve_config(run, model_uri, runtime)
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
    """Every RayJob and the RayService the operator creates for `run`, in stage order, then the run's
    NetworkPolicy (with the default peers; the chart's `networkPolicy` values change them). Not shown: the
    Secret with the run's Ray token, which the operator fills with a random one."""
    out = []
    for stage in pipeline.build(run):
        out.append(
            rayservice(run, student_model_uri(run), run.spec.serving.runtime or "torch", uid, images)
            if stage.service
            else rayjob(run, stage, uid, images=images)
        )
    return [*out, network_policy(run, Settings(), uid)]


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
