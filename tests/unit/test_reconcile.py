"""The operator's decisions, step by step, without a cluster."""

import copy
import hashlib
import json

import pytest

from kubedistill.cluster import k8s
from kubedistill.cluster.reconcile import HASH, reconcile_body
from kubedistill.core import pipeline, policy, spec
from kubedistill.core.stage import version_key
from tests.conftest import minimal_doc

NOW = "2026-11-28T00:00:00Z"
OFF = {"teacher": {"enabled": False}, "annotation": {"enabled": False}, "pruning": {"enabled": False}}


def _body(**spec_fields) -> dict:
    doc = minimal_doc(storage={"uri": "s3://b/runs"}, **{**OFF, **spec_fields})
    doc["metadata"].update(name="r1", namespace="ml", uid="uid-1", generation=1)
    return doc


def _run(body: dict) -> spec.DistillationRun:
    return spec.parse_run({k: v for k, v in body.items() if k != "status"})


def _manifest(run, stage, gate_passed=True, manifests=None):
    """What `stage` writes when it finishes: its config hash, its inputs' current digests, its own digest."""
    st = next(s for s in pipeline.build(run) if s.name == stage)
    inputs = {d: (manifests or {})[d]["digest"] for d in st.depends_on if d in (manifests or {})}
    version = version_key(st.config_hash, inputs)  # as `kubedistill.core.stage.execute` names it
    artifact = f"s3://b/runs/r1/{stage}/v-{version}"
    m = {"configHash": st.config_hash, "inputs": inputs, "version": version, "artifact": artifact,
         "metrics": {"rows": 1}, "outputs": {}}
    if stage == "student-crsd":
        m["outputs"] = {"model": f"{artifact}/model"}
    if stage == "evaluate":
        m["metrics"] = {"gate": {"candidate": "student", "passed": gate_passed, "reason": "macro-F1 0.60 < 0.70"},
                        "runtimes": RUNTIME_CHECKS}
        m["outputs"] = {"model": manifests["student-crsd"]["outputs"]["model"], "runtime": "onnx"}
    m["digest"] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]
    return m


RUNTIME_CHECKS = {
    "torch": {"passed": True, "reason": "the reference"},
    "onnx": {"passed": True, "reason": "largest probability difference to torch 3.0e-08 (<= 1e-04)"},
    "onnx-int8": {"passed": False, "reason": "int8 macro-F1 0.5900 vs fp32 0.6000: +1.00 points lost (> 0.5)"},
}


def _done(obj):
    obj = copy.deepcopy(obj)
    obj["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    return obj


class Cluster:
    """Applies plans the way the handlers do, so a test can walk a run through its stages."""

    def __init__(self, body, gate_passed=True):
        self.body, self.children, self.manifests, self.gate_passed = body, {}, {}, gate_passed

    def step(self):
        plan = reconcile_body(self.body, self.children, self.manifests.get, NOW)
        for kind, name in plan.delete:
            self.children.pop(name)
        for obj in plan.create + plan.replace:
            self.children[obj["metadata"]["name"]] = copy.deepcopy(obj)
        self.body["status"] = spec.to_wire(plan.status)
        return plan

    def through_evaluate(self):
        """Start the run and let data, student-crsd and evaluate succeed in turn."""
        self.step()
        for stage in ("data", "student-crsd", "evaluate"):
            self.finish(stage)
            self.step()
        return self

    def finish(self, stage):
        run = _run(self.body)
        name = k8s.child_name("r1", stage)
        self.children[name] = _done(self.children[name])
        self.manifests[stage] = _manifest(run, stage, self.gate_passed, self.manifests)


def _phases(plan):
    return {s.name: s.phase for s in plan.status.stages}


def test_stages_start_in_dependency_order_and_the_run_succeeds_with_serving():
    c = Cluster(_body())
    plan = c.step()
    assert [o["metadata"]["name"] for o in plan.create] == ["r1-data"]
    assert _phases(plan) == {"data": "Running", "student-crsd": "Pending", "evaluate": "Pending", "serve": "Pending"}
    assert plan.status.phase == "Running" and plan.events == [("Normal", "StageStarted", "data: created RayJob r1-data")]
    c.finish("data")
    plan = c.step()
    assert [o["metadata"]["name"] for o in plan.create] == ["r1-student-crsd"]
    data = plan.status.stages[0]
    assert data.phase == "Succeeded" and data.artifact.startswith("s3://b/runs/r1/data/v-") and data.metrics == {"rows": 1}
    c.finish("student-crsd")
    assert [o["metadata"]["name"] for o in c.step().create] == ["r1-evaluate"]
    c.finish("evaluate")
    plan = c.step()
    (svc,) = plan.create
    assert svc["kind"] == "RayService" and plan.status.phase == "Running"
    c.children["r1-serve"]["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    plan = c.step()
    assert plan.status.phase == "Succeeded" and not plan.create
    cond = {x.type: x.status for x in plan.status.conditions}
    assert cond == {"Ready": "True", "Promoted": "True", "Valid": "True"}
    assert plan.status.observed_generation == 1


def test_reconcile_is_idempotent_so_a_restarted_operator_creates_nothing_twice():
    c = Cluster(_body())
    c.step()
    again = reconcile_body(c.body, c.children, c.manifests.get, NOW)
    assert again.create == [] and again.delete == [] and _phases(again)["data"] == "Running"
    assert again.status.stages[0].attempts == 1


def test_a_failed_gate_skips_serving_with_the_reason():
    c = Cluster(_body(), gate_passed=False).through_evaluate()
    plan = c.step()
    assert _phases(plan)["serve"] == "Skipped" and "macro-F1 0.60 < 0.70" in plan.status.stages[-1].message
    assert plan.status.phase == "Succeeded" and "r1-serve" not in c.children
    promoted = next(x for x in plan.status.conditions if x.type == "Promoted")
    assert (promoted.status, promoted.reason) == ("False", "GateFailed")


def _fail(c, stage="data", message="stage data failed: ValueError: spec.data.logs: no files"):
    c.children[k8s.child_name("r1", stage)]["status"] = {
        "jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": message}


def test_backoff_doubles_per_retry_up_to_ten_minutes():
    from kubedistill.cluster.reconcile import backoff_seconds

    assert [backoff_seconds(30, n) for n in (1, 2, 3, 4, 5, 6)] == [30, 60, 120, 240, 480, 600]
    assert backoff_seconds(0, 3) == 0


def test_a_failed_stage_is_retried_after_its_backoff_as_a_new_attempt():
    c = Cluster(_body(ray={"stageRetries": 2, "retryBackoffSeconds": 30}))
    c.step()
    _fail(c)
    plan = c.step()  # attempt 1 failed: delete it, retry at NOW + 30 s
    data = plan.status.stages[0]
    assert plan.delete == [("RayJob", "r1-data")] and plan.create == [] and "r1-data" not in c.children
    assert (data.phase, data.attempts, data.retry_at) == ("Pending", 1, "2026-11-28T00:00:30Z")
    assert data.message == ("attempt 1 failed: stage data failed: ValueError: spec.data.logs: no files; "
                            "retry 1/2 at 2026-11-28T00:00:30Z")
    assert plan.status.phase == "Running" and plan.events[0][:2] == ("Warning", "StageRetrying")
    plan = c.step()  # still backing off: nothing created, the message kept
    assert plan.create == [] and plan.status.stages[0].message == data.message
    plan = reconcile_body(c.body, c.children, c.manifests.get, "2026-11-28T00:00:30Z")
    created = plan.create[0]
    assert created["metadata"]["annotations"]["kubedistill.io/attempt"] == "2"
    assert (plan.status.stages[0].phase, plan.status.stages[0].attempts, plan.status.stages[0].retry_at) == (
        "Running", 2, None)


def test_no_retry_starts_while_the_failed_attempts_rayjob_is_still_being_deleted():
    """Deleted in the foreground, the old RayJob stays (with a deletionTimestamp) until its cluster is gone."""
    c = Cluster(_body(ray={"stageRetries": 2, "retryBackoffSeconds": 30}))
    c.step()
    _fail(c)
    failed = copy.deepcopy(c.children["r1-data"])
    assert c.step().delete == [("RayJob", "r1-data")]
    failed["metadata"]["deletionTimestamp"] = NOW  # still there, marked: its cluster is going
    c.children["r1-data"] = failed
    later = "2026-11-28T00:05:00Z"  # long past the backoff
    plan = reconcile_body(c.body, c.children, c.manifests.get, later)
    assert plan.create == [] and _phases(plan)["data"] == "Pending"
    del c.children["r1-data"]  # the cluster is gone, and the RayJob with it
    plan = reconcile_body(c.body, c.children, c.manifests.get, later)
    assert [o["metadata"]["annotations"]["kubedistill.io/attempt"] for o in plan.create] == ["2"]


def test_a_stage_that_fails_past_its_retries_fails_the_run_with_its_reason():
    c = Cluster(_body(ray={"stageRetries": 1, "retryBackoffSeconds": 0}))
    c.step()
    _fail(c)
    c.step()  # retry scheduled (backoff 0)
    assert "r1-data" in c.step().status.stages[0].job and c.children["r1-data"]["metadata"]["annotations"][
        "kubedistill.io/attempt"] == "2"
    _fail(c)
    plan = c.step()
    assert plan.status.phase == "Failed" and plan.create == [] and plan.delete == []
    data = plan.status.stages[0]
    assert data.phase == "Failed" and data.attempts == 2 and "no files" in data.message
    ready = next(x for x in plan.status.conditions if x.type == "Ready")
    assert ready.status == "False" and ready.message.startswith("data: stage data failed")
    assert ("Warning", "StageFailed", "data: stage data failed: ValueError: spec.data.logs: no files") in plan.events


def test_no_retries_fails_at_once():
    c = Cluster(_body(ray={"stageRetries": 0}))
    c.step()
    _fail(c)
    assert c.step().status.phase == "Failed"


def test_a_failed_attempt_still_being_deleted_is_deleted_again_not_counted_twice():
    c = Cluster(_body(ray={"stageRetries": 2, "retryBackoffSeconds": 60}))
    c.step()
    _fail(c)
    failed = copy.deepcopy(c.children["r1-data"])
    c.step()
    c.children["r1-data"] = failed  # a finalizer kept it around
    plan = c.step()
    assert plan.delete == [("RayJob", "r1-data")] and plan.status.stages[0].attempts == 1
    assert plan.status.stages[0].phase == "Pending"


def test_a_retry_whose_status_was_lost_is_adopted_not_deleted():
    c = Cluster(_body(ray={"stageRetries": 2, "retryBackoffSeconds": 0}))
    c.step()
    _fail(c)
    c.step()
    stale = copy.deepcopy(c.body["status"])  # says: attempt 1 failed, retry pending
    c.step()  # creates attempt 2 ...
    c.body["status"] = stale  # ... but the status patch was lost (operator killed)
    plan = c.step()
    assert plan.delete == [] and plan.create == []
    assert (plan.status.stages[0].phase, plan.status.stages[0].attempts) == ("Running", 2)


def test_success_without_a_manifest_for_this_config_is_a_failure():
    c = Cluster(_body())
    c.step()
    c.children["r1-data"] = _done(c.children["r1-data"])
    plan = c.step()
    assert _phases(plan)["data"] == "Failed" and "no manifest" in plan.status.stages[0].message
    c.manifests["data"] = {**_manifest(_run(c.body), "data"), "configHash": "stale"}
    assert _phases(c.step())["data"] == "Failed"


def test_a_spec_change_reruns_only_the_stages_it_touches():
    c = Cluster(_body()).through_evaluate()
    c.body["spec"]["evaluation"] = {"minMacroF1": 0.5}
    c.body["metadata"]["generation"] = 2
    plan = c.step()
    assert plan.delete == [("RayJob", "r1-evaluate")] and plan.create == []
    assert _phases(plan)["data"] == "Succeeded" and _phases(plan)["student-crsd"] == "Succeeded"
    assert _phases(plan)["evaluate"] == "Pending" and plan.status.observed_generation == 2
    plan = c.step()
    assert [o["metadata"]["name"] for o in plan.create] == ["r1-evaluate"]


def test_an_upstream_edit_reruns_every_downstream_stage_and_serving_waits_for_the_gate():
    c = Cluster(_body()).through_evaluate()
    c.step()
    c.children["r1-serve"]["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert c.step().status.phase == "Succeeded"
    c.body["spec"]["data"] = {"synthetic": {"seed": 5}}
    plan = c.step()
    # at once: nothing downstream of data counts as Succeeded, the old RayJobs go, the RayService stays
    assert sorted(plan.delete) == [("RayJob", "r1-data"), ("RayJob", "r1-evaluate"), ("RayJob", "r1-student-crsd")]
    assert _phases(plan) == {"data": "Pending", "student-crsd": "Pending", "evaluate": "Pending", "serve": "Pending"}
    by = {s.name: s.message for s in plan.status.stages}
    assert by["student-crsd"].startswith("input data is being rebuilt (its config changed)")
    assert by["serve"].startswith("serving the previous student until the rebuilt one passes the gate")
    assert "r1-serve" in c.children and plan.status.phase == "Running"
    assert ("Normal", "StageInputsChanged", "student-crsd: input data is being rebuilt (its config changed), rerunning") in plan.events
    assert [o["metadata"]["name"] for o in c.step().create] == ["r1-data"]
    c.finish("data")
    (student,) = c.step().create
    assert student["metadata"]["annotations"][k8s.INPUTS] == policy.inputs_key(
        next(s for s in pipeline.build(_run(c.body)) if s.name == "student-crsd"), c.manifests.get)
    c.finish("student-crsd")
    assert [o["metadata"]["name"] for o in c.step().create] == ["r1-evaluate"]
    old_model = _served_model(c.children["r1-serve"])
    c.finish("evaluate")
    plan = c.step()
    assert plan.status.phase == "Succeeded" and plan.create == plan.delete == []
    # only now, with the new student through the gate, does the service roll: to the new version, by name
    (service,) = plan.replace
    new_model = c.manifests["student-crsd"]["outputs"]["model"]
    assert _served_model(service) == new_model != old_model and "/student-crsd/v-" in new_model
    assert ("Normal", "ServingUpdated", "serve: serving config changed, updating in place") in plan.events


def _served_model(rayservice):
    import yaml

    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app["args"]["model"]


def test_a_retrained_student_that_fails_the_gate_leaves_the_promoted_one_serving():
    c = Cluster(_body()).through_evaluate()
    c.step()
    c.children["r1-serve"]["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert c.step().status.phase == "Succeeded"
    served = _served_model(c.children["r1-serve"])
    c.body["spec"]["student"] = {"seed": 7}  # a new student ...
    c.step()
    c.step()
    c.finish("student-crsd")
    c.step()
    c.gate_passed = False  # ... that does not pass the gate
    c.finish("evaluate")
    plan = c.step()
    assert plan.replace == plan.delete == plan.create == []  # the RayService is left as it is
    assert _served_model(c.children["r1-serve"]) == served != c.manifests["student-crsd"]["outputs"]["model"]
    serve = next(s for s in plan.status.stages if s.name == "serve")
    assert serve.message == "still serving the last promoted student; the new one was not promoted: macro-F1 0.60 < 0.70"
    promoted = next(x for x in plan.status.conditions if x.type == "Promoted")
    assert (promoted.status, promoted.reason) == ("False", "GateFailed")


def test_a_job_that_ran_on_inputs_rebuilt_since_is_rerun():
    c = Cluster(_body()).through_evaluate()
    run = _run(c.body)
    c.manifests["data"] = _manifest(run, "data")  # data rebuilt elsewhere: a new digest, the same config
    c.manifests["data"]["digest"] = "rebuilt"
    plan = c.step()
    assert sorted(plan.delete) == [("RayJob", "r1-evaluate"), ("RayJob", "r1-student-crsd")]
    assert _phases(plan)["data"] == "Succeeded" and _phases(plan)["student-crsd"] == "Pending"
    assert plan.status.stages[1].message.startswith("input data changed")
    assert [o["metadata"]["name"] for o in c.step().create] == ["r1-student-crsd"]


def test_results_already_in_storage_for_this_spec_are_adopted_not_rerun():
    c = Cluster(_body())
    run = _run(c.body)
    for stage in ("data", "student-crsd"):
        c.manifests[stage] = _manifest(run, stage, manifests=c.manifests)
    plan = c.step()
    assert [o["metadata"]["name"] for o in plan.create] == ["r1-evaluate"]
    assert _phases(plan)["data"] == _phases(plan)["student-crsd"] == "Succeeded"
    assert plan.status.stages[0].message == "done earlier for this config and these inputs"


def test_a_corrupt_manifest_fails_its_stage_with_the_reason_and_nothing_after_it_starts():
    from kubedistill.core.stage import CorruptManifest

    c = Cluster(_body())
    c.step()
    c.finish("data")

    def reader(stage):
        if stage == "data":
            raise CorruptManifest("data", "s3://b/runs/r1/data/_SUCCESS.json", "not JSON: Expecting value")
        return c.manifests.get(stage)

    plan = reconcile_body(c.body, c.children, reader, NOW)
    data = plan.status.stages[0]
    assert (data.phase, plan.status.phase, plan.create) == ("Failed", "Failed", [])
    assert data.message == ("its manifest s3://b/runs/r1/data/_SUCCESS.json is corrupt (not JSON: Expecting value): "
                            "delete it to rerun the stage")
    assert ("Warning", "StageFailed", f"data: {data.message}") in plan.events


def test_a_serving_change_replaces_the_rayservice_in_place():
    c = Cluster(_body()).through_evaluate()
    c.step()
    c.children["r1-serve"]["metadata"]["resourceVersion"] = "42"
    old_hash = c.children["r1-serve"]["metadata"]["annotations"][HASH]
    assert reconcile_body(c.body, c.children, c.manifests.get, NOW).replace == []  # unchanged: left alone
    c.body["spec"]["serving"] = {"maxServices": 20}
    plan = c.step()
    (new,) = plan.replace
    assert plan.delete == [] and new["metadata"]["resourceVersion"] == "42"
    assert new["metadata"]["annotations"][HASH] != old_hash
    assert "maxServices: 20" in new["spec"]["serveConfigV2"]


@pytest.mark.parametrize(
    ("spec_fields", "says"),
    [
        ({"student": {"enabled": False}}, "spec.serving.enabled: serving needs a student"),
        ({"pruning": {"targetRatio": 1.0}}, "spec.pruning.targetRatio"),
        ({"serving": {"maxBatchPairs": 5}}, "spec.serving.maxBatchPairs"),
    ],
)
def test_an_invalid_resource_fails_with_a_condition_naming_the_field(spec_fields, says):
    body = _body(**spec_fields)
    plan = reconcile_body(body, {}, {}.get, NOW)
    assert plan.status.phase == "Failed" and plan.create == []
    valid = next(x for x in plan.status.conditions if x.type == "Valid")
    assert valid.status == "False" and says in valid.message
    assert plan.events[0][:2] == ("Warning", "InvalidSpec")


def test_a_status_too_big_to_write_has_its_metrics_trimmed_with_a_note():
    from kubedistill.cluster.reconcile import fit_status

    status = spec.RunStatus(phase="Succeeded", stages=[
        spec.StageStatus(name="annotate", phase="Succeeded", metrics={
            "rows_in": 10, "quarantine_reasons": {f"reason {i}": i for i in range(5000)}}),
        spec.StageStatus(name="evaluate", phase="Succeeded", message="ok", metrics={"macro_f1": 0.7})])
    assert not fit_status(status, budget=10**7)
    assert fit_status(status, budget=2000)
    assert len(status.model_dump_json(by_alias=True)) <= 2000
    annotate, evaluate = status.stages
    assert annotate.metrics == {"rows_in": 10} and "metrics trimmed" in annotate.message
    assert evaluate.metrics == {"macro_f1": 0.7} and evaluate.message == "ok"  # small enough: left whole


def _served_runtime(rayservice):
    import yaml

    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app["args"]["runtime"]


def test_the_service_runs_the_runtime_evaluate_picked_or_the_spec_names_and_refuses_one_that_failed():
    c = Cluster(_body()).through_evaluate()
    assert _served_runtime(c.children["r1-serve"]) == "onnx"  # evaluate's pick: the fastest whose check passed
    c.body["spec"]["serving"] = {"runtime": "torch"}
    plan = c.step()
    (svc,) = plan.replace
    assert _served_runtime(svc) == "torch"
    c.body["spec"]["serving"] = {"runtime": "onnx-int8"}  # failed its check on the eval set
    plan = c.step()
    serve = plan.status.stages[-1]
    assert serve.phase == "Failed" and serve.message.startswith("spec.serving.runtime: onnx-int8 failed its check")
    assert "+1.00 points lost (> 0.5)" in serve.message
    assert plan.replace == plan.create == [] and _served_runtime(c.children["r1-serve"]) == "torch"  # left serving
    assert ("Warning", "StageFailed", f"serve: {serve.message}") in plan.events


def test_a_queued_stage_is_queued_until_kueue_admits_it_then_running():
    c = Cluster(_body(ray={"queueName": "team-a"}))
    plan = c.step()
    (job,) = plan.create
    assert job["spec"]["suspend"] is True
    assert _phases(plan)["data"] == "Queued" and plan.status.phase == "Queued"
    assert plan.status.progress == "data queued in team-a"
    ready = next(x for x in plan.status.conditions if x.type == "Ready")
    assert ready.reason == "StageQueued" and "LocalQueue team-a" in ready.message
    assert [e[1] for e in plan.events] == ["StageQueued"]
    c.children["r1-data"]["status"] = {"jobDeploymentStatus": "Suspended", "jobStatus": ""}  # KubeRay's view
    plan = c.step()
    assert _phases(plan)["data"] == "Queued" and plan.events == [] and plan.create == []
    c.children["r1-data"]["spec"]["suspend"] = False  # Kueue admitted it
    c.children["r1-data"]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    plan = c.step()
    assert _phases(plan)["data"] == "Running" and plan.status.phase == "Running"
    assert plan.status.progress is None  # no report yet


def _report(done, total, at, unit="steps"):
    from kubedistill.core.progress import summarize

    return spec.StageProgress(done=done, total=total, unit=unit, rate=2.0, eta_seconds=(total - done) / 2.0,
                              metrics={"loss": 0.5}, updated_at=at,
                              summary=summarize(done, total, unit, 2.0, (total - done) / 2.0, {"loss": 0.5}))


def test_a_running_stages_progress_reaches_the_status_and_the_column_but_not_an_earlier_attempts():
    body = _body()
    c = Cluster(body)
    c.step()
    c.children["r1-data"]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    reports = {"data": _report(120, 226, "2026-11-27T23:59:00Z")}  # written before this attempt started (NOW)
    plan = reconcile_body(c.body, c.children, c.manifests.get, NOW, progress=reports.get)
    assert plan.status.stages[0].progress is None and plan.status.progress is None
    reports["data"] = _report(120, 226, NOW)
    plan = reconcile_body(c.body, c.children, c.manifests.get, NOW, progress=reports.get)
    assert plan.status.stages[0].progress == reports["data"]
    assert plan.status.progress == "data 120/226 steps ETA 53s"
    c.finish("data")
    plan = reconcile_body(c.body, c.children, c.manifests.get, NOW, progress=reports.get)
    assert plan.status.stages[0].phase == "Succeeded" and plan.status.stages[0].progress is None
