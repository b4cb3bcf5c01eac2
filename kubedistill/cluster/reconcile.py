"""The operator's decisions as one pure function: a DistillationRun and what exists in the cluster
→ what to create, replace and delete, the run's new status, and the events to record.

The kopf handlers list the run's children (by label), read stage manifests from storage, call
`reconcile`, and apply the plan. Nothing here talks to Kubernetes, so every rule is unit-tested:

- a stage starts when every stage it depends on has Succeeded; its object has a deterministic name,
  so creating it twice (an operator restarted mid-run) is "already exists", not a duplicate;
- a RayJob has finished well only when Complete + SUCCEEDED *and* its manifest is in storage;
- a failed stage is retried up to `spec.ray.stageRetries` times: its RayJob is deleted (in the foreground:
  the object stays, marked, until its Ray cluster is gone, and nothing starts while it does) and, after a
  backoff (`retryBackoffSeconds`, doubled per retry, at most 10 minutes), created again as the next
  attempt (annotated, so a restarted operator that lost its status neither double-counts nor
  deletes the new attempt); the new job resumes from the stage's checkpoint. When the retries are
  spent, the run fails with the stage's reason;
- a child whose config-hash annotation differs from the spec's is deleted and rerun (batch
  stages) or replaced in place (the RayService): a spec change reruns only the stages it touches;
- `serve` starts only when the evaluation gate passed; otherwise it is Skipped with a
  `Promoted=False` condition;
- a RayJob Kueue has not admitted (`spec.ray.queueName`: created suspended) is Queued, not Running, and so is
  the run while nothing else runs; a running stage's progress report (written since its attempt started) is
  copied into its status and the run's Progress column;
- a resource the schema could not refuse (a cross-field rule) gets phase
  Failed and a `Valid=False` condition whose message names the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubedistill.cluster import k8s
from kubedistill.core import memory, pipeline, policy
from kubedistill.core.progress import short
from kubedistill.core.spec import (
    Condition,
    ConditionStatus,
    DistillationRun,
    RunStatus,
    SpecError,
    StageProgress,
    StageStatus,
    parse_run,
)
from kubedistill.core.stage import CorruptManifest

HASH = f"{k8s.GROUP}/config-hash"
ATTEMPT = k8s.ATTEMPT
MAX_BACKOFF_S = 600


@dataclass
class Plan:
    status: RunStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    replace: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal | Warning, reason, message)
    #: kinds of trouble met on the way (e.g. "corrupt-manifest"), counted in the operator's metrics
    errors: list[str] = field(default_factory=list)
    #: the run as parsed (None when its spec is invalid): what the objects in `create` were built from
    run: DistillationRun | None = None

    @property
    def finished(self) -> bool:
        return self.status.phase in ("Succeeded", "Failed")


def backoff_seconds(base: int, failed_attempts: int) -> int:
    """Wait before retry number `failed_attempts` (1 = the first retry): base, 2·base, 4·base... ≤ 10 minutes."""
    return min(MAX_BACKOFF_S, base * 2 ** max(0, failed_attempts - 1))


def _later(now: str, seconds: int) -> str:
    t = datetime.strptime(now, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _attempt(child: dict[str, Any]) -> int:
    try:
        return int(((child.get("metadata") or {}).get("annotations") or {}).get(ATTEMPT) or 1)
    except ValueError:
        return 1


def _condition(
    conditions: list[Condition], type_: str, status: ConditionStatus, reason: str, message: str, now: str
) -> None:
    old = next((c for c in conditions if c.type == type_), None)
    if old and (old.status, old.reason, old.message) == (status, reason, message):
        return
    when = old.last_transition_time if old and old.status == status else now
    conditions[:] = [c for c in conditions if c.type != type_]
    conditions.append(Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=when))


#: what the run's .status may take (the API server refuses objects over ~1.5 MiB, and kopf keeps the
#: last-handled spec in an annotation of the same object)
STATUS_BUDGET = 256 * 1024


def fit_status(status: RunStatus, budget: int = STATUS_BUDGET) -> bool:
    """Trim the stages' metrics until the status fits `budget` bytes of JSON: first to their top-level
    numbers and strings, then away; each trimmed stage's message says so (its manifest has them all).
    True when something was trimmed."""

    def size() -> int:
        return len(status.model_dump_json(by_alias=True))

    if size() <= budget:
        return False
    for keep_scalars in (True, False):
        for st in sorted(status.stages, key=lambda s: -len(json.dumps(s.metrics, default=str))):
            if not st.metrics:
                continue
            st.metrics = (
                {k: v for k, v in st.metrics.items() if isinstance(v, (int, float, str, bool))} if keep_scalars else {}
            )
            note = "metrics trimmed to fit the run's status: the stage's manifest has them all"
            if note not in (st.message or ""):
                st.message = f"{st.message}; {note}" if st.message else note
            if size() <= budget:
                return True
    return True


def _progress_column(st: StageStatus, queue: str | None) -> str | None:
    """What `kubectl get dr` shows in its Progress column for the current stage."""
    if st.phase == "Queued":
        return f"{st.name} queued in {queue}" if queue else f"{st.name} suspended"
    if st.progress is not None:
        return f"{st.name} {short(st.progress)}"
    return None


def _on_old_inputs(child: dict[str, Any], step: policy.Step, inputs: str | None) -> bool:
    """Whether a batch stage's RayJob ran (or runs) on inputs that are no longer the current ones."""
    if not step.ready:
        return True  # an input is being rebuilt
    created_for = ((child.get("metadata") or {}).get("annotations") or {}).get(k8s.INPUTS)
    if created_for is None:  # made before RayJobs recorded their inputs: the manifests decide
        return step.cause == "input"
    return created_for != inputs


def invalid(
    body: dict[str, Any], error: Exception, previous: RunStatus | None, now: str, reason: str = "InvalidSpec"
) -> Plan:
    """The plan for a resource that cannot run: nothing created, status Failed, the field named."""
    status = RunStatus(
        phase="Failed",
        observed_generation=(body.get("metadata") or {}).get("generation"),
        stages=previous.stages if previous else [],
        conditions=list(previous.conditions) if previous else [],
    )
    message = "; ".join(str(p) for p in error.problems) if isinstance(error, SpecError) else str(error)
    _condition(status.conditions, "Valid", "False", reason, message, now)
    _condition(status.conditions, "Ready", "False", reason, message, now)
    return Plan(status, events=[("Warning", reason, message)])


def reconcile_body(
    body: dict[str, Any],
    children: dict[str, dict[str, Any]],
    manifests: Callable[[str], dict[str, Any] | None],
    now: str,
    images: k8s.Images | None = None,
    progress: Callable[[str], StageProgress | None] | None = None,
) -> Plan:
    """`reconcile` for a resource as the API server holds it (spec unvalidated, previous status inside)."""
    previous = RunStatus.model_validate(body["status"]) if body.get("status") and body["status"].get("phase") else None
    try:
        run = parse_run(
            {k: v for k, v in body.items() if k in ("apiVersion", "kind", "metadata", "spec")},
            (body.get("metadata") or {}).get("name", "<resource>"),
        )
    except SpecError as e:
        return invalid(body, e, previous, now)
    # a teacher stage that cannot fit its GPUs is refused before any RayJob is created (the estimate of
    # `kubedistill plan`, from the model's config where the operator can read it here, else the catalogue)
    refusals = memory.plan(run.spec, [s.name for s in pipeline.build(run)], local_only=True).refusals()
    if refusals:
        return invalid(body, ValueError("; ".join(refusals)), previous, now, reason="InsufficientMemory")
    meta = body.get("metadata") or {}
    return reconcile(
        run,
        children,
        manifests,
        now,
        uid=meta.get("uid"),
        generation=meta.get("generation"),
        previous=previous,
        images=images,
        progress=progress,
    )


def reconcile(
    run: DistillationRun,
    children: dict[str, dict[str, Any]],
    manifests: Callable[[str], dict[str, Any] | None],
    now: str,
    *,
    uid: str | None = None,
    generation: int | None = None,
    previous: RunStatus | None = None,
    images: k8s.Images | None = None,
    progress: Callable[[str], StageProgress | None] | None = None,
) -> Plan:
    """Decide the next step for `run` given its children (by name) and the stages' manifests in storage;
    `progress(stage)` is a running stage's latest progress report (`kubedistill.core.progress`)."""
    stages = pipeline.build(run)
    corrupt: dict[str, str] = {}
    read = manifests

    def readable(stage: str) -> dict[str, Any] | None:
        """The manifest, or None when it is corrupt (that stage then fails, saying so)."""
        try:
            return read(stage)
        except CorruptManifest as e:
            corrupt[stage] = str(e)
            return None

    manifests = readable
    steps = policy.steps(stages, manifests)  # done / stale / runnable / blocked / skipped, from manifests
    before = {s.name: s for s in (previous.stages if previous else [])}
    status = RunStatus(
        phase="Running", observed_generation=generation, conditions=list(previous.conditions) if previous else []
    )
    plan = Plan(status, run=run)
    for stage in stages:
        old = before.get(stage.name) or StageStatus(name=stage.name)
        st = StageStatus(
            name=stage.name,
            attempts=old.attempts,
            started_at=old.started_at,
            finished_at=old.finished_at,
            artifact=old.artifact,
            metrics=old.metrics,
            retry_at=old.retry_at,
            message=old.message if old.retry_at else None,
        )
        if stage.name in corrupt:
            plan.errors.append("corrupt-manifest")
            st.phase, st.message, st.finished_at = "Failed", corrupt[stage.name], st.finished_at or now
            if old.phase != "Failed":
                plan.events.append(("Warning", "StageFailed", f"{stage.name}: {st.message}"))
            status.stages.append(st)
            continue
        is_service = stage.service
        step = steps[stage.name]
        name = k8s.child_name(run.name, stage.name)
        child = children.get(name)
        inputs = policy.inputs_key(stage, manifests) if step.ready else None
        desired: dict[str, Any] | None
        if is_service:  # the student the gate passed, by version: a new version rolls the service
            try:
                ready = step.ready and step.state != "skipped"
                s = run.spec.serving
                served = pipeline.promoted(manifests, s.runtime, s.gpus_per_replica > 0) if ready else None
            except ValueError as e:  # the runtime the spec asks for failed its check: nothing is served
                if old.phase != "Failed":
                    plan.events.append(("Warning", "StageFailed", f"{stage.name}: {e}"))
                st.phase, st.message, st.finished_at = "Failed", str(e), st.finished_at or now
                status.stages.append(st)
                continue
            desired = k8s.rayservice(run, served.model, served.runtime, uid, images) if served else None
        else:
            desired = k8s.rayjob(run, stage, uid, attempt=st.attempts + 1, inputs=inputs, images=images)
        stale = (
            child is not None
            and desired is not None
            and (child.get("metadata", {}).get("annotations") or {}).get(HASH)
            != desired["metadata"]["annotations"][HASH]
        )
        if child is not None and (child.get("metadata") or {}).get("deletionTimestamp"):
            # deleted in the foreground: the old attempt's cluster is still going; nothing starts until it is gone
            st.phase = "Pending"
            st.message = st.message or "waiting for the previous RayJob and its Ray cluster to be deleted"
            status.stages.append(st)
            continue
        if stale and child is not None and not is_service:  # delete now, create once it is gone (a later reconcile)
            plan.delete.append((child["kind"], name))
            plan.events.append(("Normal", "StageConfigChanged", f"{stage.name}: config changed, rerunning"))
            st.phase, st.message, st.finished_at, st.metrics, st.artifact = (
                "Pending",
                "config changed: rerunning once the old RayJob is deleted",
                None,
                {},
                None,
            )
            status.stages.append(st)
            continue
        if child is not None and not is_service and _on_old_inputs(child, step, inputs):
            # an input was rebuilt (or is being rebuilt): what this job ran on no longer holds
            why = step.reason or "its inputs changed"
            plan.delete.append((child["kind"], name))
            plan.events.append(("Normal", "StageInputsChanged", f"{stage.name}: {why}, rerunning"))
            st.phase, st.message, st.finished_at, st.metrics, st.artifact = (
                "Pending",
                f"{why}: rerunning once its inputs are done and the old RayJob is deleted",
                None,
                {},
                None,
            )
            status.stages.append(st)
            continue
        if stale and child is not None and desired is not None:
            desired["metadata"]["resourceVersion"] = child["metadata"].get("resourceVersion")
            plan.replace.append(desired)
            plan.events.append(("Normal", "ServingUpdated", f"{stage.name}: serving config changed, updating in place"))
        if child is not None and not is_service and _attempt(child) > st.attempts:
            st.attempts, st.retry_at = _attempt(child), None  # created, but the status saying so was lost
        if child is None:
            if step.state == "done":  # its manifest follows from this spec and these inputs: nothing to run
                done = manifests(stage.name) or {}
                st.phase, st.message = "Succeeded", "done earlier for this config and these inputs"
                st.artifact, st.metrics = done.get("artifact"), done.get("metrics") or {}
                st.finished_at = st.finished_at or done.get("finishedAt") or now
            elif not step.ready:
                st.phase, st.message = "Pending", step.reason
            elif step.state == "skipped":
                why = step.gate_reason
                st.phase, st.message = "Skipped", step.reason
                _condition(status.conditions, "Promoted", "False", "GateFailed", why, now)
            elif st.retry_at and now < st.retry_at:
                st.phase = "Pending"  # backing off; the message says when the retry starts
            elif desired is None:  # a service whose model is not known yet
                st.phase, st.message = "Pending", "waiting for the evaluation gate to name a student"
            else:
                plan.create.append(desired)
                st.started_at, st.finished_at, st.attempts = now, None, st.attempts + 1
                # what the next reconcile will read off the new object (no status yet): one status write, not two
                st.phase, st.message = (k8s.rayservice_phase if is_service else k8s.rayjob_phase)(desired)
                st.phase = "Queued" if st.phase == "Queued" else "Running"
                st.job, st.retry_at = name, None
        elif st.retry_at and not is_service:  # the failed attempt is still being deleted
            plan.delete.append((child["kind"], name))
            st.phase = "Pending"
        elif is_service and not step.ready:  # the RayService keeps serving what passed the gate last
            st.job, st.phase = name, "Pending"
            st.message = f"serving the previous student until the rebuilt one passes the gate ({step.reason})"
        elif is_service and step.state == "skipped":  # the new student failed the gate: the old one stays
            why = step.gate_reason
            st.job, (st.phase, serving) = name, k8s.rayservice_phase(child)
            st.message = f"still serving the last promoted student; the new one was not promoted: {why}"
            if serving and st.phase != "Succeeded":
                st.message += f" ({serving})"
            _condition(status.conditions, "Promoted", "False", "GateFailed", why, now)
        else:
            st.job = name
            st.phase, st.message = k8s.rayservice_phase(child) if is_service else k8s.rayjob_phase(child)
            if st.phase == "Failed" and not is_service and st.attempts <= run.spec.ray.stage_retries:
                wait = backoff_seconds(run.spec.ray.retry_backoff_seconds, st.attempts)
                st.retry_at = _later(now, wait)
                st.message = (
                    f"attempt {st.attempts} failed: {st.message}; retry {st.attempts}/"
                    f"{run.spec.ray.stage_retries} at {st.retry_at}"
                )
                plan.delete.append((child["kind"], name))
                plan.events.append(("Warning", "StageRetrying", f"{stage.name}: {st.message}"))
                st.phase = "Pending"
            if st.phase == "Succeeded" and not is_service:
                manifest = manifests(stage.name)
                if manifest is None or step.state != "done":
                    st.phase, st.message = "Failed", "the RayJob succeeded but wrote no manifest for this config"
                else:
                    st.artifact, st.metrics = manifest["artifact"], manifest["metrics"]
            if st.phase == "Succeeded" and is_service:
                _condition(status.conditions, "Promoted", "True", "Serving", f"RayService {name} is ready", now)
            if st.phase in ("Succeeded", "Failed") and not st.finished_at:
                st.finished_at = now
        if st.phase != old.phase and st.phase in ("Succeeded", "Failed"):
            kind = "Warning" if st.phase == "Failed" else "Normal"
            plan.events.append((kind, f"Stage{st.phase}", f"{stage.name}: {st.message or st.phase.lower()}"))
        elif st.phase in ("Running", "Queued") and old.phase != st.phase and child is None and desired is not None:
            queued = f", {st.message}" if st.phase == "Queued" else ""
            plan.events.append(
                (
                    "Normal",
                    f"Stage{st.phase.replace('Running', 'Started')}",
                    f"{stage.name}: created {desired['kind']} {name}{queued}",
                )
            )
        if st.phase == "Running" and child is not None and not is_service and progress is not None:
            p = progress(stage.name)  # this attempt's, not an earlier one's: written since it started
            st.progress = p if p is not None and p.updated_at >= (st.started_at or "") else None
        status.stages.append(st)

    failed = next((s for s in status.stages if s.phase == "Failed"), None)
    running = next((s for s in status.stages if s.phase in ("Running", "Queued", "Pending")), None)
    if failed:
        status.phase, status.current_stage = "Failed", failed.name
        plan.create = []  # nothing new starts after a failure
        _condition(status.conditions, "Ready", "False", "StageFailed", f"{failed.name}: {failed.message}", now)
    elif running:
        waiting = running.phase == "Queued" and not any(s.phase == "Running" for s in status.stages)
        status.phase, status.current_stage = "Queued" if waiting else "Running", running.name
        status.progress = _progress_column(running, run.spec.ray.queue_name)
        _condition(
            status.conditions,
            "Ready",
            "False",
            "StageQueued" if running.phase == "Queued" else "StageRunning",
            f"{running.name}: {running.message or 'pending'}",
            now,
        )
    else:
        status.phase, status.current_stage = "Succeeded", None
        _condition(status.conditions, "Ready", "True", "Succeeded", "every stage finished", now)
    _condition(status.conditions, "Valid", "True", "Valid", "", now)
    if fit_status(status):
        plan.errors.append("status-trimmed")
    return plan
