"""The operator's I/O around the reconcile, without an API server: blocking conditions, what it reads and skips,
what it writes and when it asks to be woken."""

import pytest

from kubedistill.cluster import controller
from kubedistill.core.storage import Storage

NOW = "2026-11-28T00:00:00Z"


def test_a_blocked_run_keeps_its_stages_and_says_what_to_do():
    body = {"metadata": {"name": "r1", "generation": 3},
            "status": {"phase": "Running", "stages": [{"name": "data", "phase": "Running", "attempts": 1}],
                       "kopf": {"progress": {}}}}  # foreign keys in .status are ignored
    plan = controller.blocked(body, "KubeRayAvailable", "KubeRayMissing", controller.KUBERAY_HINT, NOW)
    assert plan.status.phase == "Running" and plan.status.stages[0].attempts == 1
    assert plan.status.observed_generation == 3 and plan.create == [] and plan.delete == []
    cond = {c.type: c for c in plan.status.conditions}
    assert (cond["KubeRayAvailable"].status, cond["KubeRayAvailable"].reason) == ("False", "KubeRayMissing")
    assert "helm install kuberay-operator" in cond["Ready"].message
    assert plan.events == [("Warning", "KubeRayMissing", controller.KUBERAY_HINT)]


def test_a_new_blocked_run_is_pending():
    plan = controller.blocked({"metadata": {"name": "r1"}}, "StorageReachable", "SecretMissing", "x", NOW)
    assert plan.status.phase == "Pending"


def test_the_manifest_reader_reads_each_stage_once(tmp_path):
    st = Storage(str(tmp_path))
    st.write_json("data/_SUCCESS.json", {"digest": "abc"})
    read = controller.manifest_reader(st)
    assert read("data") == {"digest": "abc"} and read("evaluate") is None
    st.write_json("evaluate/_SUCCESS.json", {"digest": "def"})
    st.delete("data/_SUCCESS.json")
    assert read("data") == {"digest": "abc"} and read("evaluate") is None  # one reconcile, one view
    assert controller.manifest_reader(st)("evaluate") == {"digest": "def"}


def test_children_are_keyed_by_the_run_label_and_keep_their_kind():
    job = {"metadata": {"name": "r1-data", "namespace": "ml", "labels": {"kubedistill.io/run": "r1"}}}
    svc = {"kind": "RayService", "metadata": {"name": "r1-serve", "labels": {"kubedistill.io/run": "r1"}}}
    assert controller.child_key(job) == ("ml", "r1")
    assert controller.child_key(svc) == ("default", "r1")
    assert controller.child_key({"metadata": {"name": "someone-elses", "labels": {"app": "x"}}}) is None
    got = controller.children_by_name({"RayJob": [job], "RayService": [svc]})
    assert {n: o["kind"] for n, o in got.items()} == {"r1-data": "RayJob", "r1-serve": "RayService"}


def test_the_operator_imports_no_ml_or_serving_library():
    """The operator's process loads what reconciling needs, even after rendering every object of a run and
    reading a manifest: not torch, numpy, scikit-learn, FastAPI, Ray or the official Kubernetes client (pyarrow stays, without numpy: the
    manifests are read through its S3 filesystem, as the stages write them)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = (
        "import runpy, sys, tempfile; runpy.run_path('operator/run.py', run_name='launcher'); "
        "runpy.run_path('operator/handlers.py', run_name='handlers'); "
        "from kubedistill.cluster import k8s, reconcile; from kubedistill.core import spec, stage, storage; "
        "run = spec.parse_run({'apiVersion': 'kubedistill.io/v1alpha1', 'kind': 'DistillationRun', "
        "'metadata': {'name': 'r'}, 'spec': {'storage': {'uri': 's3://b/runs'}}}); k8s.render(run, uid='u'); "
        "st = storage.Storage(tempfile.mkdtemp()); st.write_json('data/_SUCCESS.json', {'digest': 'd'}); "
        "assert stage.read_manifest(st, 'data') == {'digest': 'd'}; "
        "heavy = ('kubernetes', 'torch', 'numpy', 'sklearn', 'scipy', 'pandas', 'fastapi', 'starlette', 'ray', 'transformers', "
        "'vllm', 'matplotlib', 'peft'); print(sorted(m for m in heavy if sys.modules.get(m) is not None))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_children_are_deleted_in_the_foreground():
    """So a failed attempt's RayJob stays visible until its Ray cluster is gone (see reconcile)."""
    from kubedistill.cluster import reconcile
    from kubedistill.core import spec

    calls = []

    class Recorder:  # the one CustomObjectsApi call this plan makes
        def delete_namespaced_custom_object(self, *args, **kwargs):
            calls.append((args, kwargs))

    plan = reconcile.Plan(spec.RunStatus(), delete=[("RayJob", "r1-data")])
    controller.Cluster(Recorder(), None).apply(plan, "ml")
    assert calls == [(("ray.io", "v1", "ml", "rayjobs", "r1-data"), {"propagation_policy": "Foreground"})]


class _Secrets:
    """A CoreV1Api that accepts the run's token Secret (created before the first RayJob)."""

    def create_namespaced_secret(self, namespace, body):
        return body


def _refusing(status: int, message: str):
    """A CustomObjectsApi whose create is refused as the API server refuses it (status, JSON body)."""
    import json

    from kubedistill.cluster.kubeapi import ApiError

    class Refusing:
        def create_namespaced_custom_object(self, *args, **kwargs):
            raise ApiError(status, "Refused",
                               json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status}))

    return Refusing()


def _errors(kind: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("kubedistill_operator_errors_total", {"kind": kind}) or 0.0


def _body(tmp_path):
    from tests.conftest import minimal_doc

    body = minimal_doc(storage={"uri": str(tmp_path)}, teacher={"enabled": False}, annotation={"enabled": False},
                       pruning={"enabled": False})
    body["metadata"].update(name="r1", namespace="ml", uid="u1", generation=1)
    return body


def test_an_object_the_api_server_refuses_fails_the_run_naming_the_object_and_field(tmp_path):
    says = 'RayJob.ray.io "r1-data" is invalid: spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]' \
           '.resources.limits.memory: Invalid value: "lots"'
    before = _errors("api-invalid")
    plan = controller.Controller(controller.Cluster(_refusing(422, says), _Secrets())).reconcile_run(_body(tmp_path), {}, NOW)
    valid = next(c for c in plan.status.conditions if c.type == "Valid")
    assert plan.status.phase == "Failed" and (valid.status, valid.reason) == ("False", "InvalidSpec")
    assert valid.message == f"the API server refused to create RayJob ml/r1-data: {says}"
    assert _errors("api-invalid") == before + 1


def test_a_forbidden_request_is_a_condition_naming_what_to_grant_and_the_run_waits(tmp_path):
    says = 'rayjobs.ray.io is forbidden: User "system:serviceaccount:kd:kubedistill" cannot create resource "rayjobs"'
    before = _errors("forbidden")
    plan = controller.Controller(controller.Cluster(_refusing(403, says), _Secrets())).reconcile_run(_body(tmp_path), {}, NOW)
    cond = next(c for c in plan.status.conditions if c.type == "Authorized")
    assert plan.status.phase == "Pending" and (cond.status, cond.reason) == ("False", "Forbidden")
    assert cond.message.startswith(f"the operator may not create RayJob ml/r1-data: {says}; grant it in the chart's RBAC")
    assert _errors("forbidden") == before + 1


def test_a_finished_run_is_not_polled_until_its_spec_a_child_or_its_deletion_changes(tmp_path, monkeypatch):
    from kubedistill.cluster import k8s
    from kubedistill.core import pipeline, policy, spec, stage
    from kubedistill.core.storage import Storage

    body = _body(tmp_path)
    body["spec"].update(student={"enabled": False}, serving={"enabled": False})
    for s in pipeline.build(spec.parse_run(body)):  # every stage done in storage: the run is finished
        stage.execute(stage.StageContext(s.config, stage.run_storage(s.config)),
                      lambda ctx: {"metrics": {"gate": {"candidate": "baseline", "passed": True, "reason": "ok"}}})
    reads = []
    real = Storage.read_bytes
    monkeypatch.setattr(Storage, "read_bytes", lambda self, rel: reads.append(rel) or real(self, rel))

    class NoCalls:  # the Kubernetes API: a finished run needs no create, delete or patch
        def __getattr__(self, name):
            raise AssertionError(f"unexpected API call {name}")

    ctl = controller.Controller(controller.Cluster(NoCalls(), NoCalls()))
    plan = ctl.reconcile_run(body, {}, NOW)
    assert plan is not None and plan.status.phase == "Succeeded" and reads
    reads.clear()
    assert ctl.reconcile_run(body, {}, NOW) is None and reads == []  # steady state: nothing read, nothing called
    body["status"] = spec.to_wire(plan.status)  # its own status write does not wake it
    assert ctl.reconcile_run(body, {}, NOW) is None
    run = spec.parse_run(body)
    data = pipeline.build(run)[0]
    child = k8s.rayjob(run, data, "u1", inputs=policy.inputs_key(data, lambda _: None))  # its finished RayJob
    child["metadata"]["resourceVersion"] = "7"
    child["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    assert ctl.reconcile_run(body, {"r1-data": child}, NOW) is not None  # a child appeared or changed
    assert ctl.reconcile_run(body, {"r1-data": child}, NOW) is None
    body["metadata"]["generation"] = 2  # an edit
    assert ctl.reconcile_run(body, {"r1-data": child}, NOW) is not None and reads


class _Api:
    """The Kubernetes API calls the operator makes, recorded; `secrets` are what read_namespaced_secret finds."""

    def __init__(self, secrets=None):
        self.calls: list[tuple[str, str]] = []
        self.secrets = dict(secrets or {})

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.calls.append(("create", body["metadata"]["name"]))

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, **_):
        self.calls.append(("delete", name))

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body):
        self.calls.append(("status", body["status"]["phase"]))

    def create_namespaced_secret(self, namespace, body):
        self.calls.append(("token", body["metadata"]["name"]))

    def create_namespaced_event(self, namespace, body):
        assert body["involvedObject"]["kind"] == "DistillationRun" and body["involvedObject"]["uid"] == "u1"
        self.calls.append(("event", body["reason"]))

    def read_namespaced_secret(self, name, namespace):
        from kubedistill.cluster.kubeapi import ApiError

        self.calls.append(("secret", name))
        if name not in self.secrets:
            raise ApiError(status=404, reason="Not Found")
        return {"metadata": {"labels": {"kubedistill.io/storage-credentials": "true"}}, "data": self.secrets[name]}


def _running(tmp_path, monkeypatch):
    """A run whose data stage is done in storage and whose student RayJob is running; storage reads recorded."""
    from kubedistill.cluster import k8s
    from kubedistill.core import pipeline, policy, spec, stage

    body = _body(tmp_path)
    run = spec.parse_run(body)
    data = pipeline.build(run)[0]
    stage.execute(stage.StageContext(data.config, stage.run_storage(data.config)), lambda ctx: {"metrics": {}})
    st = Storage(str(tmp_path / "r1"))
    student = next(s for s in pipeline.build(run) if s.name.startswith("student"))
    child = k8s.rayjob(run, student, "u1", inputs=policy.inputs_key(student, lambda s: controller.read_manifest(st, s)))
    child["metadata"]["resourceVersion"] = "5"
    child["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    reads: list[str] = []
    real = Storage.read_bytes

    def read(self, rel):  # the stages whose manifest is read (the report's own reads aside)
        if rel.endswith("_SUCCESS.json"):
            reads.append(rel.split("/")[0])
        return real(self, rel)

    monkeypatch.setattr(Storage, "read_bytes", read)
    return body, {child["metadata"]["name"]: child}, reads


def test_an_event_that_changed_nothing_costs_nothing_and_a_childs_change_rereads_only_its_stage(tmp_path, monkeypatch):
    from kubedistill.cluster.workqueue import Why

    body, children, reads = _running(tmp_path, monkeypatch)
    api = _Api()
    ctl = controller.Controller(controller.Cluster(api, api))
    # nothing is due but the running stage's next progress read
    assert ctl.sync(body, children, NOW, Why.FRESH) == ctl.progress_seconds
    assert ctl.reports.flush()  # the run report (written off the reconcile's thread) reads manifests too
    first = sorted(set(reads))
    assert "data" in first and any(r.startswith("student") for r in first)  # every stage's manifest, once
    assert ("status", "Running") in api.calls
    reads.clear()
    api.calls.clear()
    body["metadata"]["resourceVersion"] = "99"  # the watch brings back its own status write
    assert ctl.reconcile_run(body, children, NOW, Why.CHANGED) is None and reads == [] and api.calls == []
    (job,) = children.values()
    job["metadata"]["resourceVersion"] = "6"  # KubeRay updated the student's RayJob
    assert ctl.sync(body, children, NOW, Why.CHANGED) == ctl.progress_seconds
    assert [r for r in reads if not r.startswith("student")] == [] and reads  # only the student's manifest
    assert api.calls == []  # nothing new to say: no status write, no event
    reads.clear()
    ctl.sync(body, children, NOW, Why.FRESH)  # the resync reads everything again, unchanged stages too
    assert "data" in reads and any(r.startswith("student") for r in reads)


def test_a_failed_stage_asks_to_be_woken_when_its_retry_backoff_ends(tmp_path, monkeypatch):
    from kubedistill.cluster.workqueue import Why

    body, children, _ = _running(tmp_path, monkeypatch)
    body["spec"]["ray"] = {"stageRetries": 2, "retryBackoffSeconds": 30}
    (job,) = children.values()
    api = _Api()
    ctl = controller.Controller(controller.Cluster(api, api))
    ctl.sync(body, children, NOW, Why.FRESH)
    job["metadata"]["resourceVersion"] = "6"
    job["status"] = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "node lost"}
    api.calls.clear()
    assert ctl.sync(body, children, NOW, Why.CHANGED) == 31.0  # 30 s, plus the second `now` cannot resolve
    assert ("delete", job["metadata"]["name"]) in api.calls and ("event", "StageRetrying") in api.calls


def test_a_storage_secret_is_read_once_per_resync_and_again_after_trouble(tmp_path, monkeypatch):
    from kubedistill.cluster.workqueue import Why
    from kubedistill.core.storage import StorageError

    keys = {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}
    monkeypatch.setattr(controller, "write_report", lambda *a: None)  # no store behind s3://bucket
    api = _Api()
    ctl = controller.Controller(controller.Cluster(api, api), retry_seconds=7)
    bodies = []
    for name in ("r1", "r2"):
        body = _body(tmp_path)
        body["metadata"]["name"] = name
        body["spec"]["storage"] = {"uri": "s3://bucket/runs", "secretRef": {"name": "creds"}}
        bodies.append(body)
    assert ctl.sync(bodies[0], {}, NOW, Why.FRESH) == 7  # no Secret yet: blocked, tried again in retry_seconds
    api.secrets["creds"] = keys
    monkeypatch.setattr(controller, "read_manifest", lambda store, stage: None)
    assert ctl.sync(bodies[0], {}, NOW, Why.DUE) is None and ctl.sync(bodies[1], {}, NOW, Why.FRESH) is None
    assert api.calls.count(("secret", "creds")) == 2  # the miss, then one read for both runs
    ctl.begin_sweep()
    ctl.sync(bodies[0], {}, NOW, Why.FRESH)
    ctl.sync(bodies[1], {}, NOW, Why.FRESH)
    assert api.calls.count(("secret", "creds")) == 3  # once per sweep

    def down(store, stage):
        raise StorageError("s3://bucket/runs/r1: connection refused")

    monkeypatch.setattr(controller, "read_manifest", down)
    assert ctl.sync(bodies[0], {}, NOW, Why.FRESH) == 7
    ctl.sync(bodies[1], {}, NOW, Why.FRESH)
    assert api.calls.count(("secret", "creds")) == 4  # the credentials may be what failed: read again


def test_what_the_operator_keeps_of_an_object_is_what_the_reconcile_reads():
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "spec": {"entrypoint": "x" * 10_000},
           "metadata": {"name": "r1-data", "resourceVersion": "3", "managedFields": [{"manager": "x"}],
                        "annotations": {"kubedistill.io/config-hash": "h",
                                        "kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
           "status": {"jobStatus": "RUNNING"}}
    kept = controller.slim(job)
    assert "spec" not in kept and "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"kubedistill.io/config-hash": "h"} and kept["status"] == job["status"]
    run = {"apiVersion": "kubedistill.io/v1alpha1", "kind": "DistillationRun", "spec": {"a": 1}, "metadata": {"name": "r"}}
    assert controller.slim(run)["spec"] == {"a": 1}


def test_reports_are_written_off_the_reconcile_one_run_at_a_time_the_newest_status_last(monkeypatch):
    import threading

    from kubedistill.core import spec

    written: list[tuple[str, str]] = []
    busy: set[str] = set()
    gate = threading.Event()

    def write(store, run, status):
        assert run not in busy, "two reports of one run at once"
        busy.add(run)
        gate.wait(10)
        written.append((run, status.phase))
        busy.discard(run)

    monkeypatch.setattr(controller, "write_report", write)
    reports = controller.Reports(threads=2)
    reports.submit("ns/a", None, "a", spec.RunStatus(phase="Pending"))
    reports.submit("ns/a", None, "a", spec.RunStatus(phase="Running"))  # while the first may be being written
    reports.submit("ns/a", None, "a", spec.RunStatus(phase="Succeeded"))
    reports.submit("ns/b", None, "b", spec.RunStatus(phase="Failed"))
    assert not reports.flush(timeout=0.05)  # held at the gate: the caller did not wait for any of it
    gate.set()
    assert reports.flush(timeout=10)
    a = [phase for run, phase in written if run == "a"]
    assert a[-1] == "Succeeded" and "Running" not in a[1:] and len(a) <= 2  # skipped what the newest replaced
    assert ("b", "Failed") in written


def test_a_status_write_that_failed_is_tried_again_even_for_a_finished_run(tmp_path):
    from kubedistill.cluster.kubeapi import ApiError

    from kubedistill.cluster.workqueue import Why
    from kubedistill.core import pipeline, spec, stage

    body = _body(tmp_path)
    body["spec"].update(student={"enabled": False}, serving={"enabled": False})
    for s in pipeline.build(spec.parse_run(body)):  # every stage done: the run finishes at once
        stage.execute(stage.StageContext(s.config, stage.run_storage(s.config)),
                      lambda ctx: {"metrics": {"gate": {"candidate": "baseline", "passed": True, "reason": "ok"}}})

    class Flaky(_Api):
        fail = True

        def patch_namespaced_custom_object_status(self, *args):
            if self.fail:
                self.fail = False
                raise ApiError(status=500, reason="etcd timeout")
            super().patch_namespaced_custom_object_status(*args)

    api = Flaky()
    ctl = controller.Controller(controller.Cluster(api, api))
    with pytest.raises(ApiError):
        ctl.sync(body, {}, NOW, Why.CHANGED)
    ctl.sync(body, {}, NOW, Why.DUE)  # the workers' retry
    assert ("status", "Succeeded") in api.calls


def test_a_run_made_again_under_the_same_name_does_not_inherit_the_status_written_for_the_old_one(tmp_path, monkeypatch):
    from kubedistill.cluster.workqueue import Why

    body, children, _ = _running(tmp_path, monkeypatch)
    api = _Api()
    ctl = controller.Controller(controller.Cluster(api, api))
    ctl.sync(body, children, NOW, Why.FRESH)
    again = {**body, "metadata": {**body["metadata"], "uid": "u2"}, "status": None}
    assert ctl._current("ml/r1", again) == {k: None for k in controller.STATUS_KEYS}
    assert ctl._current("ml/r1", body)["phase"] == "Running"


def test_a_finished_stage_is_timed_from_its_start_once_and_one_found_done_is_not():
    from kubedistill.core.spec import RunStatus, StageStatus

    before = RunStatus(stages=[StageStatus(name="data", phase="Running", started_at="2026-11-28T00:00:00Z"),
                               StageStatus(name="student-crsd", phase="Pending")])
    after = RunStatus(stages=[
        StageStatus(name="data", phase="Succeeded", started_at="2026-11-28T00:00:00Z", finished_at="2026-11-28T00:02:30Z"),
        StageStatus(name="student-crsd", phase="Succeeded", finished_at="2026-11-28T00:02:30Z")])  # done earlier
    assert controller.finished_stages(before, after) == [("data", "Succeeded", 150.0)]
    assert controller.finished_stages(after, after) == []  # observed once, not at every reconcile
