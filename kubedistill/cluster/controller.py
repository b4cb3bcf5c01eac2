"""The operator's I/O around `reconcile`: read a run's manifests, apply the plan.

`operator/handlers.py` is kopf wiring only; it calls `reconcile_run` on a timer per DistillationRun
with the run's children (RayJobs, RayService) from kopf's in-memory indexes, which its watches keep
current: a reconcile lists nothing, so 200 runs cost the API server two watches, not 400 lists
every interval. kopf fills the indexes before the first handler runs, so a restarted operator sees
every child it created before.
What can go wrong with the cluster or storage is turned into the run's status here, never into a
crash loop:

- KubeRay's CRDs are not installed (the API has no `ray.io/v1` RayJob): condition
  `KubeRayAvailable=False` with what to install; the run stays Pending and is retried.
- The run's storage cannot be read (bad credentials, endpoint down): condition `StorageReachable=False`
  naming the URI and what to check; retried. Storage the security policy refuses (a Secret without the
  opt-in label, a plain-HTTP endpoint the chart does not list, an endpoint without a Secret: see
  `security`): the same condition with reason `StorageRefused`; nothing is read or created.
- Before a run's first Ray cluster: its Ray-token Secret and its NetworkPolicy (`k8s.token_secret`,
  `k8s.network_policy`), created once and kept current.
- A child already exists when created (an operator restarted between creating it and recording it):
  success. A child already gone when deleted: success.
- The API server refuses an object (400/422, e.g. `memory: lots`): the run fails with `Valid=False`
  naming the object and the field, as the API server does. 403: condition `Authorized=False` naming
  the verb and the object the operator may not touch; retried. Counted by kind in
  `kubedistill_operator_errors_total`, with corrupt manifests and trimmed statuses.

Metrics (Prometheus, served by the operator process): reconciles by result, reconcile seconds,
stage events by reason, runs by phase.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as kclient
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, Histogram

from kubedistill.cluster import k8s, reconcile, security
from kubedistill.core import spec
from kubedistill.core.stage import read_manifest, run_prefix
from kubedistill.core.storage import S3Options, Storage, StorageError

log = logging.getLogger("kubedistill.cluster.controller")

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices"}
KUBERAY_HINT = (
    "KubeRay's CRDs (ray.io/v1 RayJob, RayService) are not installed in this cluster: install the "
    "KubeRay operator (helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0)"
)

RECONCILES = Counter("kubedistill_operator_reconciles", "Reconciles of a DistillationRun, by result.", ["result"])
RECONCILE_SECONDS = Histogram("kubedistill_operator_reconcile_seconds", "Time of one reconcile.")
STAGE_EVENTS = Counter("kubedistill_operator_stage_events", "Events the operator recorded, by reason.", ["reason"])
ERRORS = Counter(
    "kubedistill_operator_errors",
    "Trouble turned into a run's status, by kind: api-invalid (400/422), forbidden (403), corrupt-manifest, "
    "status-trimmed.",
    ["kind"],
)
STORAGE_READS = Counter("kubedistill_operator_storage_reads", "Stage manifests the operator read from storage.")
RUNS = Gauge("kubedistill_operator_runs", "DistillationRuns this operator tracks, by phase.", ["phase"])


class KubeRayMissing(RuntimeError):
    pass


class ApiRefused(RuntimeError):
    """The API server refused a request for one object with a status that a retry will not change."""

    def __init__(self, verb: str, kind: str, name: str, namespace: str, e: ApiException):
        self.status, self.verb, self.kind, self.name = e.status, verb, kind, name
        detail = _api_message(e)
        if e.status == 403:
            message = (
                f"the operator may not {verb} {kind} {namespace}/{name}: {detail}; grant it in the chart's RBAC "
                "(charts/kubedistill/templates/rbac.yaml) or the namespace's policy"
            )
        else:
            message = f"the API server refused to {verb} {kind} {namespace}/{name}: {detail}"
        super().__init__(message)


def _api_message(e: ApiException) -> str:
    """The API server's own message (it names the field at fault), else its reason."""
    import json

    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except ValueError:
        return str(e.body or e.reason)


#: statuses that name a problem with the object or the operator's rights: retrying the same request will not help
_REFUSED = (400, 403, 422)


class SecretMissing(RuntimeError):
    pass


class StorageRefused(RuntimeError):
    """The run's storage settings break the operator's security policy (`security`): the message says which."""


def _absent(e: ApiException) -> bool:
    return e.status == 404


def child_key(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, run) of a RayJob or RayService the operator created; None for any other."""
    meta = obj.get("metadata") or {}
    run = (meta.get("labels") or {}).get(f"{k8s.GROUP}/run")
    return (meta.get("namespace") or "default", run) if run else None


def children_by_name(objs: Mapping[str, Iterable[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The run's children as `reconcile` takes them: name → object, each with its `kind`."""
    out: dict[str, dict[str, Any]] = {}
    for kind, items in objs.items():
        for obj in items:
            out[obj["metadata"]["name"]] = {**obj, "kind": obj.get("kind") or kind}
    return out


@dataclass
class Cluster:
    """The few API calls the operator makes, through the official Kubernetes client."""

    custom: kclient.CustomObjectsApi
    core: kclient.CoreV1Api
    networking: kclient.NetworkingV1Api | None = None

    @classmethod
    def connect(cls) -> Cluster:
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = kclient.ApiClient()
        return cls(kclient.CustomObjectsApi(api), kclient.CoreV1Api(api), kclient.NetworkingV1Api(api))

    def ensure_run_objects(self, token: dict[str, Any], policy: dict[str, Any] | None, namespace: str) -> None:
        """The run's Ray-token Secret (created once: an existing one keeps its token) and its NetworkPolicy
        (created, or brought up to date: the chart's peers may have changed), before any of its Ray clusters."""
        # an existing token (409) stays as it is: the run's running clusters use it
        _created("create", token, namespace, lambda: self.core.create_namespaced_secret(namespace, token))
        if policy is None or self.networking is None:
            return
        networking = self.networking
        if not _created(
            "create", policy, namespace, lambda: networking.create_namespaced_network_policy(namespace, policy)
        ):
            _created(
                "update",
                policy,
                namespace,
                lambda: networking.patch_namespaced_network_policy(
                    policy["metadata"]["name"], namespace, {"spec": policy["spec"]}
                ),
            )

    def apply(self, plan: reconcile.Plan, namespace: str) -> None:
        for kind, name in plan.delete:
            try:
                self.custom.delete_namespaced_custom_object(
                    # Foreground: the RayJob stays (marked for deletion) until its RayCluster and pods are
                    # gone, so the next attempt never starts beside the old one's driver
                    RAY_GROUP,
                    RAY_VERSION,
                    namespace,
                    PLURALS[kind],
                    name,
                    propagation_policy="Foreground",
                )
            except ApiException as e:
                if _absent(e):
                    continue
                if e.status in _REFUSED:
                    raise ApiRefused("delete", kind, name, namespace, e) from e
                raise
        for obj in plan.create:
            try:
                self.custom.create_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, namespace, PLURALS[obj["kind"]], obj
                )
            except ApiException as e:
                if e.status == 409:
                    continue  # created by an earlier reconcile whose status write was lost
                if _absent(e):
                    raise KubeRayMissing(KUBERAY_HINT) from e
                if e.status in _REFUSED:
                    raise ApiRefused("create", obj["kind"], obj["metadata"]["name"], namespace, e) from e
                raise
        for obj in plan.replace:
            body = {"metadata": {"annotations": obj["metadata"]["annotations"]}, "spec": obj["spec"]}
            try:
                self.custom.patch_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, namespace, PLURALS[obj["kind"]], obj["metadata"]["name"], body
                )
            except ApiException as e:
                if e.status in _REFUSED:
                    raise ApiRefused("update", obj["kind"], obj["metadata"]["name"], namespace, e) from e
                raise

    def s3_options(self, namespace: str, storage: dict[str, Any], policy: security.Settings) -> S3Options:
        """The run's S3 settings, with the credentials of its `secretRef` (the stage pods get the same keys), as
        the security policy allows them: an opted-in Secret, an allowed endpoint, never the operator's own
        credentials for an endpoint the run chose."""
        endpoint = storage.get("endpoint")
        if refused := security.endpoint_refused(endpoint, policy.allowed_endpoints):
            raise StorageRefused(refused)
        ref = (storage.get("secretRef") or {}).get("name")
        if not ref:
            if refused := security.ambient_refused(endpoint, os.environ.get("AWS_ENDPOINT_URL")):
                raise StorageRefused(refused)
            return S3Options.from_env(endpoint, storage.get("region"))
        try:
            obj = self.core.read_namespaced_secret(ref, namespace)
        except ApiException as e:
            if _absent(e):
                raise SecretMissing(
                    f"spec.storage.secretRef: secret {ref!r} not found in namespace {namespace}; create it with "
                    f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and label it {security.CREDENTIALS_LABEL}=true"
                ) from e
            raise
        try:
            key, secret = security.credentials(ref, namespace, obj.metadata.labels or {}, obj.data or {})
        except security.CredentialsRefused as e:
            raise StorageRefused(str(e)) from None
        return dataclasses.replace(
            S3Options.from_env(endpoint, storage.get("region")), access_key=key, secret_key=secret
        )


def _created(verb: str, obj: dict[str, Any], namespace: str, call: Callable[[], Any]) -> bool:
    """Make one API call for `obj`: True when done, False when it already exists (409); a refusal (400/403/422)
    becomes ApiRefused naming the object, anything else is raised as it is."""
    try:
        call()
    except ApiException as e:
        if e.status == 409:
            return False
        if e.status in _REFUSED:
            raise ApiRefused(verb, obj["kind"], obj["metadata"]["name"], namespace, e) from e
        raise
    return True


def _run_key(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


def _fingerprint(body: dict[str, Any], children: dict[str, dict[str, Any]]) -> tuple[Any, ...]:
    """What a reconcile of a finished run depends on in the cluster: its generation (the spec), its deletion,
    and each child's resourceVersion (a RayService turning unhealthy, a RayJob deleted by hand)."""
    meta = body.get("metadata") or {}
    kids = tuple(sorted((n, (c.get("metadata") or {}).get("resourceVersion")) for n, c in children.items()))
    return meta.get("generation"), meta.get("deletionTimestamp"), kids


def images_from_env(env: Mapping[str, str]) -> k8s.Images:
    """The stage pods' default images: $KUBEDISTILL_STAGE_IMAGE (the chart sets the operator's own image) and
    $KUBEDISTILL_STAGE_IMAGE_GPU (its GPU variant); this release's published images where unset."""
    release = k8s.Images.release()
    cpu = env.get("KUBEDISTILL_STAGE_IMAGE") or release.cpu
    return k8s.Images(cpu, env.get("KUBEDISTILL_STAGE_IMAGE_GPU") or (release.gpu if cpu == release.cpu else cpu))


def _no_manifests(_stage: str) -> dict[str, Any] | None:
    """A run without storage has no stage manifests."""
    return None


def manifest_reader(storage: Storage) -> Callable[[str], dict[str, Any] | None]:
    """stage → its `_SUCCESS.json` under the run's prefix (None if absent); each read at most once per reconcile."""
    cache: dict[str, dict[str, Any] | None] = {}

    def read(stage: str) -> dict[str, Any] | None:
        if stage not in cache:
            STORAGE_READS.inc()
            cache[stage] = read_manifest(storage, stage)
        return cache[stage]

    return read


def _phases(status: spec.RunStatus) -> tuple[str, ...]:
    return (status.phase, *(f"{s.name}={s.phase}" for s in status.stages))


def write_report(store: Storage, run: str, status: spec.RunStatus) -> None:
    """The run report (`report.html` beside the stages' outputs), rewritten whenever a stage's phase changed.
    A report that cannot be written is logged, never a reason to hold the run back."""
    from kubedistill import report

    try:
        report.write(store, run, [s.name for s in status.stages], status)
    except Exception as e:  # noqa: BLE001 - the report is a convenience; the run's status is the record
        log.warning("run %s: could not write the run report: %s", run, e)


def _previous(body: dict[str, Any]) -> spec.RunStatus:
    status = {
        k: v
        for k, v in (body.get("status") or {}).items()
        if k in ("phase", "currentStage", "observedGeneration", "stages", "conditions")
    }
    return spec.RunStatus.model_validate(status) if status.get("phase") else spec.RunStatus()


def blocked(body: dict[str, Any], type_: str, reason: str, message: str, now: str) -> reconcile.Plan:
    """The plan when the cluster or storage cannot be used yet: nothing changes but the conditions."""
    status = _previous(body)
    status.observed_generation = (body.get("metadata") or {}).get("generation")
    reconcile._condition(status.conditions, type_, "False", reason, message, now)
    reconcile._condition(status.conditions, "Ready", "False", reason, message, now)
    return reconcile.Plan(status, events=[("Warning", reason, message)])


@dataclass
class Controller:
    """One per operator process: serialises reconciles of the same run and keeps the phase gauge."""

    cluster: Cluster
    #: what stage pods run when a run sets no spec.ray.image (`images_from_env`)
    images: k8s.Images = field(default_factory=k8s.Images.release)
    #: the chart's security settings (`security.Settings.from_env`)
    policy: security.Settings = field(default_factory=security.Settings)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _phases: dict[str, str] = field(default_factory=dict)
    #: finished runs, by key: what they and their children were when last reconciled (`_fingerprint`)
    _finished: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def reconcile_run(
        self, body: dict[str, Any], children: dict[str, dict[str, Any]], now: str
    ) -> reconcile.Plan | None:
        """The run's next plan, applied; None for a finished run that nothing touched since it finished
        (its spec, its children and its deletion are unchanged): that costs no API or storage call."""
        key = _run_key(body)
        seen = _fingerprint(body, children)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            if self._finished.get(key) == seen:
                RECONCILES.labels("idle").inc()
                return None
        with lock, RECONCILE_SECONDS.time():
            plan, result = self._reconcile(body, children, now)
        RECONCILES.labels(result).inc()
        for _, reason, _ in plan.events:
            STAGE_EVENTS.labels(reason).inc()
        finished = (
            result in ("ok", "api-invalid")  # not a run waiting on storage, a Secret, KubeRay or its rights
            and plan.status.phase in ("Succeeded", "Failed")
            and not (plan.create or plan.delete or plan.replace)
        )
        with self._guard:
            if finished:
                self._finished[key] = seen
            else:
                self._finished.pop(key, None)
        self._track(key, plan.status.phase)
        return plan

    def forget(self, body: dict[str, Any]) -> None:
        key = _run_key(body)
        with self._guard:
            self._finished.pop(key, None)
        self._track(key, None)

    def _reconcile(
        self, body: dict[str, Any], children: dict[str, dict[str, Any]], now: str
    ) -> tuple[reconcile.Plan, str]:
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta["name"]
        storage_spec = (body.get("spec") or {}).get("storage") or {}
        store: Storage | None = None
        try:
            manifests: Callable[[str], dict[str, Any] | None] = _no_manifests
            if storage_spec.get("uri"):
                options = self.cluster.s3_options(namespace, storage_spec, self.policy)
                store = Storage(run_prefix(storage_spec["uri"], name), options)
                manifests = manifest_reader(store)
            previous = _previous(body)
            plan = reconcile.reconcile_body(
                {**body, "status": previous.model_dump(by_alias=True)}, children, manifests, now, self.images
            )
            if plan.create and plan.run:  # its Ray clusters need the run's token Secret; its NetworkPolicy guards them
                self._ensure_run_objects(plan.run, meta.get("uid"), namespace)
            self.cluster.apply(plan, namespace)
            if store is not None and _phases(previous) != _phases(plan.status):
                write_report(store, name, plan.status)
        except KubeRayMissing as e:
            return blocked(body, "KubeRayAvailable", "KubeRayMissing", str(e), now), "kuberay-missing"
        except StorageError as e:
            return blocked(body, "StorageReachable", "StorageUnreachable", str(e), now), "storage-error"
        except SecretMissing as e:
            return blocked(body, "StorageReachable", "SecretMissing", str(e), now), "secret-missing"
        except StorageRefused as e:
            return blocked(body, "StorageReachable", "StorageRefused", str(e), now), "storage-refused"
        except ApiRefused as e:
            if e.status == 403:  # the operator's rights, not the run: it stays as it is, and says what to grant
                ERRORS.labels("forbidden").inc()
                return blocked(body, "Authorized", "Forbidden", str(e), now), "forbidden"
            ERRORS.labels("api-invalid").inc()  # 400/422: the object the run's spec made is invalid
            return reconcile.invalid(body, e, _previous(body), now), "api-invalid"
        for kind in plan.errors:
            ERRORS.labels(kind).inc()
        for type_ in ("KubeRayAvailable", "StorageReachable", "Authorized"):  # recovered: drop the blocking condition
            plan.status.conditions = [c for c in plan.status.conditions if c.type != type_]
        return plan, "ok"

    def _ensure_run_objects(self, run: spec.DistillationRun, uid: str | None, namespace: str) -> None:
        token = k8s.token_secret(run, secrets.token_urlsafe(32), uid)
        policy = k8s.network_policy(run, self.policy, uid) if self.policy.network_policy else None
        self.cluster.ensure_run_objects(token, policy, namespace)

    def _track(self, key: str, phase: str | None) -> None:
        with self._guard:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts: dict[str, int] = {}
            for p in self._phases.values():
                counts[p] = counts.get(p, 0) + 1
        for p in ("Pending", "Running", "Succeeded", "Failed"):
            RUNS.labels(p).set(counts.get(p, 0))
