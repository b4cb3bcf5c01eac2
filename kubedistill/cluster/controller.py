"""The operator's I/O around `reconcile`: read a run's manifests, apply the plan, write its status and events.

`operator/handlers.py` is kopf wiring only; its workers (`workqueue`) call `Controller.sync` for a run when
it or one of its children changed, when a timer the run asked for ends, and at each resync, with the run's
children (RayJobs, RayService) from kopf's in-memory indexes, which its watches keep current: a reconcile
lists nothing. kopf fills the indexes before the first handler runs, so a restarted operator sees every
child it created before. What a reconcile reads scales with what changed (see `Controller`): an event
that changed nothing costs nothing, a manifest is read again when its stage's RayJob changed or at a
resync, the storage Secret once per resync, and a finished run nothing until it is touched.
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
stage events by reason, runs by phase, manifests read and reports written, reports pending (and the
queue's, in `workqueue`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from kubedistill.cluster import k8s, reconcile, security
from kubedistill.cluster.kubeapi import ApiError, Connection, Kube
from kubedistill.cluster.workqueue import Why
from kubedistill.core import progress, spec
from kubedistill.core.stage import read_manifest, run_prefix
from kubedistill.core.storage import S3Options, Storage, StorageError

log = logging.getLogger("kubedistill.cluster.controller")

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices"}
RUN_PLURAL = "distillationruns"
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
STORAGE_READS = Counter(
    "kubedistill_operator_storage_reads", "Stage manifests and progress reports the operator read from storage."
)
STORAGE_WRITES = Counter("kubedistill_operator_storage_writes", "Run reports the operator wrote to storage.")
REPORTS_PENDING = Gauge("kubedistill_operator_reports_pending", "Run reports waiting to be written or being written.")
RUNS = Gauge("kubedistill_operator_runs", "DistillationRuns this operator tracks, by phase.", ["phase"])
STAGE_SECONDS = Histogram(
    "kubedistill_operator_stage_seconds",
    "Time from a stage's RayJob created to the stage finished (Succeeded or Failed, its last attempt).",
    ["stage", "phase"],
    buckets=(60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 3 * 24 * 3600),
)


class KubeRayMissing(RuntimeError):
    pass


class ApiRefused(RuntimeError):
    """The API server refused a request for one object with a status that a retry will not change."""

    def __init__(self, verb: str, kind: str, name: str, namespace: str, e: ApiError):
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


def _api_message(e: ApiError) -> str:
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


def _absent(e: ApiError) -> bool:
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

    #: the calls of the official client's CustomObjectsApi, CoreV1Api and NetworkingV1Api the operator makes
    #: (`kubeapi.Kube` has them all)
    custom: Any
    core: Any
    networking: Any | None = None
    #: storage Secrets as last read, by (namespace, name): (labels, data); dropped at each resync and whenever
    #: a run using one cannot reach its storage, so a rotated or relabelled Secret is seen then
    _secrets: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def connect(cls, connections: int = 16) -> Cluster:
        """The operator's client: `connections` HTTP connections, one per reconcile thread."""
        kube = Kube(Connection.find(), connections)
        return cls(kube, kube, kube)

    def write_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge `status` into the run's .status (the status subresource); False when the run is gone."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                spec.API_GROUP, spec.API_VERSION, namespace, RUN_PLURAL, name, {"status": status}
            )
        except ApiError as e:
            if _absent(e):
                return False
            raise
        return True

    def post_event(self, run: dict[str, Any], type_: str, reason: str, message: str, now: str) -> None:
        """A Kubernetes Event about the run (`kubectl describe dr`). One that cannot be posted is logged."""
        meta = run.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{spec.API_GROUP}/{spec.API_VERSION}",
                "kind": spec.KIND,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubedistill-operator"},
            "reportingComponent": "kubedistill-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(namespace, event)
        except Exception as e:  # noqa: BLE001 - an event is a courtesy; the status is the record
            log.warning("run %s/%s: could not post event %s: %s", namespace, meta.get("name"), reason, e)

    def forget_secrets(self) -> None:
        self._secrets.clear()

    def forget_secret(self, namespace: str, name: str | None) -> None:
        if name:
            self._secrets.pop((namespace, name), None)

    def _secret(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        if (hit := self._secrets.get((namespace, name))) is not None:
            return hit
        try:
            obj = self.core.read_namespaced_secret(name, namespace)
        except ApiError as e:
            if _absent(e):
                raise SecretMissing(
                    f"spec.storage.secretRef: secret {name!r} not found in namespace {namespace}; create it with "
                    f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and label it {security.CREDENTIALS_LABEL}=true"
                ) from e
            raise
        meta = obj.get("metadata") or {}
        got = self._secrets[(namespace, name)] = (dict(meta.get("labels") or {}), dict(obj.get("data") or {}))
        return got

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
            except ApiError as e:
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
            except ApiError as e:
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
            except ApiError as e:
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
        labels, data = self._secret(namespace, ref)
        try:
            key, secret = security.credentials(ref, namespace, labels, data)
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
    except ApiError as e:
        if e.status == 409:
            return False
        if e.status in _REFUSED:
            raise ApiRefused(verb, obj["kind"], obj["metadata"]["name"], namespace, e) from e
        raise
    return True


def _run_key(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _fingerprint(body: dict[str, Any], children: dict[str, dict[str, Any]]) -> tuple[Any, ...]:
    """What a reconcile depends on in the cluster: the run (its uid: a run deleted and made again under the
    same name is another), its generation (the spec), its deletion, and each child's resourceVersion (a RayJob
    finishing, a RayService turning unhealthy, a RayJob deleted by hand). Not the run's own resourceVersion,
    which its status writes bump."""
    meta = body.get("metadata") or {}
    kids = tuple(sorted((n, (c.get("metadata") or {}).get("resourceVersion")) for n, c in children.items()))
    return meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp"), kids


#: what the operator keeps of an object's metadata (kopf's indexes hold one copy of every run and child)
_META = ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp", "labels", "annotations")


#: annotations that hold a copy of the object (kubectl apply's, kopf's), never read by the operator
_COPIES = ("/last-applied-configuration", "/last-handled-configuration", "/last-spec")


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as the operator keeps it in memory: a child without its spec (the reconcile reads its
    metadata and status, and a RayJob's `suspend`: Kueue's admission), a run with its spec; neither with
    managedFields or kopf's annotations."""
    meta = obj.get("metadata") or {}
    kept = {k: meta[k] for k in _META if k in meta}
    if "annotations" in kept:
        kept["annotations"] = {k: v for k, v in kept["annotations"].items() if not k.endswith(_COPIES)}
    out = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": kept, "status": obj.get("status")}
    if obj.get("kind") == spec.KIND:
        out["spec"] = obj.get("spec")
    elif "suspend" in (obj.get("spec") or {}):
        out["spec"] = {"suspend": obj["spec"]["suspend"]}
    return out


def images_from_env(env: Mapping[str, str]) -> k8s.Images:
    """The stage pods' default images: $KUBEDISTILL_STAGE_IMAGE (the chart sets the operator's own image) and
    $KUBEDISTILL_STAGE_IMAGE_GPU (its GPU variant); this release's published images where unset."""
    release = k8s.Images.release()
    cpu = env.get("KUBEDISTILL_STAGE_IMAGE") or release.cpu
    return k8s.Images(cpu, env.get("KUBEDISTILL_STAGE_IMAGE_GPU") or (release.gpu if cpu == release.cpu else cpu))


def _no_manifests(_stage: str) -> dict[str, Any] | None:
    """A run without storage has no stage manifests."""
    return None


#: (the stage's child's resourceVersion when read, or None without a child; the manifest or None)
Cached = tuple[str | None, dict[str, Any] | None]


def manifest_reader(
    storage: Storage,
    cache: dict[str, Cached] | None = None,
    version_of: Callable[[str], str | None] = lambda _stage: None,
) -> Callable[[str], dict[str, Any] | None]:
    """stage → its `_SUCCESS.json` under the run's prefix (None if absent), read at most once per reconcile.

    With a `cache` kept between reconciles, a manifest is read again only when the stage's child changed
    since (`version_of(stage)`, its resourceVersion, differs from the one it was read under): a stage's
    manifest is written by its RayJob, which then changes. What else changes storage (a manifest deleted
    by hand) is seen when the cache is dropped (the operator's resync)."""
    cache = {} if cache is None else cache
    seen: dict[str, dict[str, Any] | None] = {}

    def read(stage: str) -> dict[str, Any] | None:
        if stage in seen:
            return seen[stage]
        version = version_of(stage)
        hit = cache.get(stage)
        if hit is not None and hit[0] == version:
            seen[stage] = hit[1]
            return hit[1]
        STORAGE_READS.inc()
        manifest = read_manifest(storage, stage)  # a corrupt one raises, is not cached, and is read again
        cache[stage] = (version, manifest)
        seen[stage] = manifest
        return manifest

    return read


def progress_reader(storage: Storage) -> Callable[[str], spec.StageProgress | None]:
    """stage → its latest progress report (`<stage>/_PROGRESS.json`), read when a reconcile asks."""

    def read(stage: str) -> spec.StageProgress | None:
        STORAGE_READS.inc()
        return progress.read(storage, stage)

    return read


#: the keys of .status the operator owns
STATUS_KEYS = ("phase", "currentStage", "progress", "observedGeneration", "stages", "conditions")
#: reconcile results that leave a run waiting on something no watch reports (its storage, Secret, KubeRay, rights)
BLOCKED = ("kuberay-missing", "storage-error", "secret-missing", "storage-refused", "forbidden")


def _until_retry(status: spec.RunStatus, now: str) -> float | None:
    """Seconds until the earliest stage retry that is still ahead (its backoff ends), else None."""
    ahead = [s.retry_at for s in status.stages if s.retry_at and s.retry_at > now]
    if not ahead:
        return None
    parse = lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    return (parse(min(ahead)) - parse(now)).total_seconds() + 1.0  # `now` has whole seconds


def finished_stages(before: spec.RunStatus, after: spec.RunStatus) -> list[tuple[str, str, float]]:
    """(stage, phase, seconds from start to finish) of each stage that finished between two statuses of a run;
    a stage found done earlier (never started by this run) has no duration."""
    was = {s.name: s.phase for s in before.stages}
    parse = lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    return [
        (s.name, s.phase, (parse(s.finished_at) - parse(s.started_at)).total_seconds())
        for s in after.stages
        if s.phase in ("Succeeded", "Failed") and was.get(s.name) != s.phase and s.started_at and s.finished_at
    ]


def _phases(status: spec.RunStatus) -> tuple[str, ...]:
    return (status.phase, *(f"{s.name}={s.phase}" for s in status.stages))


def write_report(store: Storage, run: str, status: spec.RunStatus) -> None:
    """The run report (`report.html` beside the stages' outputs), rewritten whenever a stage's phase changed.
    A report that cannot be written is logged, never a reason to hold the run back."""
    from kubedistill import report

    try:
        STORAGE_WRITES.inc()
        report.write(store, run, [s.name for s in status.stages], status)
    except Exception as e:  # noqa: BLE001 - the report is a convenience; the run's status is the record
        log.warning("run %s: could not write the run report: %s", run, e)


class Reports:
    """Run reports, written by `threads` threads of their own, the newest status per run: a reconcile never
    waits for one, and a run whose status moves on before its report is written gets only the newest. Few at
    once: each S3 upload holds a buffer of several MiB (pyarrow's), so 16 at once cost the operator about
    120 MiB more at its peak (measured with `benchmarks/operator_scale.py`)."""

    def __init__(self, threads: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="report")
        self._pending: dict[str, tuple[Storage, str, spec.RunStatus]] = {}
        self._writing: set[str] = set()
        self._idle = threading.Condition()

    def submit(self, key: str, store: Storage, run: str, status: spec.RunStatus) -> None:
        with self._idle:
            schedule = key not in self._pending and key not in self._writing
            self._pending[key] = (store, run, status.model_copy(deep=True))
            REPORTS_PENDING.set(len(self._pending) + len(self._writing))
        if schedule:
            self._pool.submit(self._drain, key)

    def _drain(self, key: str) -> None:
        while True:  # one writer per run at a time, so the newest report is the one left in storage
            with self._idle:
                job = self._pending.pop(key, None)
                if job is None:
                    self._writing.discard(key)
                    REPORTS_PENDING.set(len(self._pending) + len(self._writing))
                    self._idle.notify_all()
                    return
                self._writing.add(key)
            write_report(*job)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every submitted report is written; False if `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and not self._writing, timeout)


def _previous(body: dict[str, Any]) -> spec.RunStatus:
    status = {k: v for k, v in (body.get("status") or {}).items() if k in STATUS_KEYS}
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
    """One per operator process: reconciles one run at a time each, remembers what each run's last reconcile
    depended on (so an event that changed none of it costs nothing), caches manifests between reconciles,
    writes status and events, and keeps the phase gauge."""

    cluster: Cluster
    #: what stage pods run when a run sets no spec.ray.image (`images_from_env`)
    images: k8s.Images = field(default_factory=k8s.Images.release)
    #: the chart's security settings (`security.Settings.from_env`)
    policy: security.Settings = field(default_factory=security.Settings)
    #: seconds before a run blocked on its storage, Secret, KubeRay or rights is tried again
    retry_seconds: float = 10.0
    #: seconds between two reads of a running stage's progress (copied into the run's status)
    progress_seconds: float = 30.0
    reports: Reports = field(default_factory=Reports)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _phases: dict[str, str] = field(default_factory=dict)
    #: by run: what it and its children were at its last reconcile (`_fingerprint`), and whether it had finished
    _seen: dict[str, tuple[tuple[Any, ...], bool]] = field(default_factory=dict)
    #: by run: its manifests as last read (`manifest_reader`), for the generation they were read under
    _manifests: dict[str, tuple[Any, dict[str, Cached]]] = field(default_factory=dict)
    #: by run: (its uid, the status this process last wrote)
    _written: dict[str, tuple[str | None, dict[str, Any]]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def reconcile_run(
        self, body: dict[str, Any], children: dict[str, dict[str, Any]], now: str, why: Why = Why.DUE
    ) -> reconcile.Plan | None:
        """The run's next plan, applied; None when nothing it depends on changed since its last reconcile: a
        finished run whose spec, children and deletion are unchanged (whatever `why`), or any run named by an
        event (`Why.CHANGED`) that changed none of them (its own status write). A skip costs no API or storage
        call. `Why.FRESH` reads every manifest again."""
        return self._reconcile_run(body, children, now, why)[0]

    def sync(self, body: dict[str, Any], children: dict[str, dict[str, Any]], now: str, why: Why) -> float | None:
        """Reconcile the run and write what follows: its children (the plan), its .status (only when it
        changed), its events. Returns the seconds after which it must be reconciled again though nothing
        changes (a stage's retry backoff, a blocked run's next try), or None."""
        plan, result = self._reconcile_run(body, children, now, why)
        if plan is None:
            return None
        meta = body.get("metadata") or {}
        key = _run_key(body)
        wire = spec.to_wire(plan.status)
        new = {k: wire.get(k) for k in STATUS_KEYS}
        try:
            changed = new != self._current(key, body)
            if changed and self.cluster.write_status(meta.get("namespace") or "default", meta["name"], new):
                with self._guard:
                    if plan.finished:
                        self._written.pop(key, None)
                    else:
                        self._written[key] = (meta.get("uid"), new)
        except Exception:
            with self._guard:  # not written: the next try must not take the run as settled
                self._seen.pop(key, None)
            raise
        for type_, reason, message in plan.events:
            self.cluster.post_event(body, type_, reason, message, now)
        if result in BLOCKED:
            return self.retry_seconds
        waits = [_until_retry(plan.status, now)]
        # a RayJob running (not one just created: its creation is an event of its own): nothing watched says how
        # far its stage is, so its progress report is read again after a while
        created = {((o["metadata"].get("labels") or {}).get(f"{k8s.GROUP}/stage")) for o in plan.create}
        if any(s.phase == "Running" and s.name != "serve" and s.name not in created for s in plan.status.stages):
            waits.append(self.progress_seconds)
        return min((w for w in waits if w is not None), default=None)

    def begin_sweep(self) -> None:
        """A resync starts: every Secret is read again once."""
        self.cluster.forget_secrets()

    def _current(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        """The run's status as this process last wrote it (the watch may not have brought it back yet), else as
        the API server has it; never another run's of the same name."""
        with self._guard:
            uid, written = self._written.get(key) or (None, None)
        if written is not None and uid == (body.get("metadata") or {}).get("uid"):
            return written
        return {k: (body.get("status") or {}).get(k) for k in STATUS_KEYS}

    def _reconcile_run(
        self, body: dict[str, Any], children: dict[str, dict[str, Any]], now: str, why: Why
    ) -> tuple[reconcile.Plan | None, str]:
        key = _run_key(body)
        seen = _fingerprint(body, children)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            last = self._seen.get(key)
            if last is not None and last[0] == seen and (last[1] or why == Why.CHANGED):
                RECONCILES.labels("idle").inc()
                return None, "idle"
            generation = seen[:2]  # (uid, generation): the manifests a spec's stages name
            cached = self._manifests.get(key)
            if cached is None or cached[0] != generation or why == Why.FRESH:
                cached = self._manifests[key] = (generation, {})
        with lock, RECONCILE_SECONDS.time():
            current = self._current(key, body)
            if current.get("phase"):
                body = {**body, "status": current}
            plan, result = self._reconcile(body, children, now, cached[1])
        RECONCILES.labels(result).inc()
        for _, reason, _ in plan.events:
            STAGE_EVENTS.labels(reason).inc()
        finished = (
            result in ("ok", "api-invalid")  # not a run waiting on storage, a Secret, KubeRay or its rights
            and plan.status.phase in ("Succeeded", "Failed")
            and not (plan.create or plan.delete or plan.replace)
        )
        with self._guard:
            self._seen[key] = (seen, finished)
            if finished:  # it costs nothing until touched: nothing of it is kept but the fingerprint
                self._manifests.pop(key, None)
            else:  # what it creates or deletes is read again next time
                name = (body.get("metadata") or {}).get("name", "")
                touched = {o["metadata"]["name"] for o in plan.create} | {n for _, n in plan.delete}
                for stage in [s for s in cached[1] if k8s.child_name(name, s) in touched]:
                    del cached[1][stage]
        self._track(key, plan.status.phase)
        return plan, result

    def forget_key(self, key: str) -> None:
        """A run that is gone (`namespace/name`): nothing of it is kept."""
        with self._guard:
            for memory in (self._seen, self._manifests, self._written, self._locks):
                memory.pop(key, None)
        self._track(key, None)

    def _reconcile(
        self, body: dict[str, Any], children: dict[str, dict[str, Any]], now: str, cache: dict[str, Cached]
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

                def version_of(stage: str) -> str | None:
                    child = children.get(k8s.child_name(name, stage)) or {}
                    return (child.get("metadata") or {}).get("resourceVersion")

                manifests = manifest_reader(store, cache, version_of)
            previous = _previous(body)
            plan = reconcile.reconcile_body(
                {**body, "status": previous.model_dump(by_alias=True)},
                children,
                manifests,
                now,
                self.images,
                progress=None if store is None else progress_reader(store),
            )
            if plan.create and plan.run:  # its Ray clusters need the run's token Secret; its NetworkPolicy guards them
                self._ensure_run_objects(plan.run, meta.get("uid"), namespace)
            self.cluster.apply(plan, namespace)
            for stage, phase, seconds in finished_stages(previous, plan.status):
                STAGE_SECONDS.labels(stage, phase).observe(seconds)
            if store is not None and _phases(previous) != _phases(plan.status):
                self.reports.submit(f"{namespace}/{name}", store, name, plan.status)
        except KubeRayMissing as e:
            return blocked(body, "KubeRayAvailable", "KubeRayMissing", str(e), now), "kuberay-missing"
        except (StorageError, SecretMissing, StorageRefused) as e:
            # the credentials may be what is wrong: the next try reads the Secret again
            self.cluster.forget_secret(namespace, (storage_spec.get("secretRef") or {}).get("name"))
            reason, result = (
                ("SecretMissing", "secret-missing")
                if isinstance(e, SecretMissing)
                else ("StorageRefused", "storage-refused")
                if isinstance(e, StorageRefused)
                else ("StorageUnreachable", "storage-error")
            )
            return blocked(body, "StorageReachable", reason, str(e), now), result
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
        for p in ("Pending", "Queued", "Running", "Succeeded", "Failed"):
            RUNS.labels(p).set(counts.get(p, 0))
