"""The operator end to end: `python operator/run.py` (kopf run of operator/handlers.py) against an emulated
Kubernetes API, stages executed by a KubeRay stand-in on a local Ray cluster, artifacts on SeaweedFS S3.

What the emulator does not do is checked on the objects themselves: owner references (what the
garbage collector follows) and KubeRay schema validity (tests/unit/test_k8s.py)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import S3Options, Storage
from kubedistill.stages.serving import post_json
from tests.conftest import ACCESS_KEY, SECRET_KEY, free_port, minimal_doc
from tests.e2e.conftest import s3_secret, wait_for
from tests.e2e.kuberay import KubeRay

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]

SMALL = {"services": 60, "queries": 40, "pairsPerQuery": 5, "sftSize": 20, "evalSize": 60, "seed": 1}


def _doc(name: str, bucket: str, endpoint: str, encoder: str, **spec_fields) -> dict:
    spec_fields = {
        "storage": {"uri": f"s3://{bucket}/runs", "endpoint": endpoint, "secretRef": {"name": "s3-credentials"}},
        "data": {"synthetic": SMALL},
        "teacher": {"enabled": False}, "annotation": {"enabled": False}, "pruning": {"enabled": False},
        "student": {"baseModel": encoder, "maxLength": 48, "maxReasoningTokens": 24, "objective": "ce",
                    "train": {"batchSize": 16, "learningRate": 1e-3, "epochs": 1}, "resources": {"workers": 1}},
        # a 2-layer encoder after one epoch: promoted whatever the lexical baseline scores (the comparison off)
        "evaluation": {"minMacroF1": 0.0, "minGainOverBaseline": -1.0},
        "serving": {"maxServices": 10, "replicas": {"min": 1, "max": 1}},
        "ray": {"stageRetries": 2, "retryBackoffSeconds": 1},
        **spec_fields,
    }
    doc = minimal_doc(**spec_fields)
    doc["metadata"]["name"] = name
    return doc


RUNS = "/apis/kubedistill.io/v1alpha1/namespaces/default/distillationruns"


def _served_model(cluster) -> str:
    import yaml

    (service,) = cluster.children("rayservices")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app["args"]["model"]


def _stage(run: dict, name: str) -> dict:
    return next(s for s in run["status"]["stages"] if s["name"] == name)


def _condition(run: dict, type_: str) -> dict | None:
    return next((c for c in run["status"].get("conditions") or [] if c["type"] == type_), None)


@pytest.mark.cost(170)
def test_a_run_succeeds_through_kuberay_despite_an_evicted_stage_and_an_operator_restart(
        cluster, ray_dashboard, seaweed, tiny_encoder):
    seaweed.create_bucket("kd-e2e-run")
    cluster.secret("default", "s3-credentials", s3_secret())
    serve_port = free_port()
    with KubeRay(cluster.api, ray_dashboard, serve_port, evict_at={"student-crsd": "train.checkpoint-reported"},
                 holds=cluster.tmp / "holds") as kuberay:
        op = cluster.start_operator(allowed_endpoints=seaweed.endpoint)
        uid = cluster.apply(_doc("sample", "kd-e2e-run", seaweed.endpoint, tiny_encoder))["metadata"]["uid"]
        # the first student attempt is evicted; the operator retries it after its backoff
        wait_for("student-crsd attempt 2", lambda: (r := cluster.run("sample")) and r.get("status") and
                 _stage(r, "student-crsd")["attempts"] == 2, 300, logs=cluster.operator_logs)
        op.stop(signal.SIGKILL)  # the operator dies mid-run ...
        cluster.start_operator(allowed_endpoints=seaweed.endpoint)  # ... and a new one carries on from the cluster's state
        run = wait_for("the run to finish", cluster.phase("sample", "Succeeded", "Failed"), 600,
                       logs=lambda: cluster.operator_logs() + f"\nKubeRay stand-in errors: {kuberay.errors[-5:]}")
        assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
        assert not kuberay.errors, kuberay.errors

        # nothing ran twice: one Ray job per RayJob attempt, the evicted stage twice, the rest once
        assert collections.Counter(kuberay.submitted) == {
            ("sample-data", "1"): 1, ("sample-student-crsd", "1"): 1, ("sample-student-crsd", "2"): 1,
            ("sample-evaluate", "1"): 1}
        st = run["status"]
        assert [(s["name"], s["phase"], s["attempts"]) for s in st["stages"]] == [
            ("data", "Succeeded", 1), ("student-crsd", "Succeeded", 2), ("evaluate", "Succeeded", 1),
            ("serve", "Succeeded", 1)]
        assert st["observedGeneration"] == 1 and st.get("currentStage") is None  # null in a merge patch: removed
        assert _condition(run, "Ready")["status"] == "True" and _condition(run, "Promoted")["status"] == "True"
        store = Storage("s3://kd-e2e-run/runs/sample", S3Options(seaweed.endpoint, "us-east-1", ACCESS_KEY, SECRET_KEY))
        for name in ("data", "student-crsd", "evaluate"):
            manifest = store.read_json(f"{name}/{MANIFEST}")
            assert _stage(run, name)["artifact"] == manifest["artifact"] and manifest["artifact"].startswith("s3://kd-e2e-run/")
        assert _stage(run, "evaluate")["metrics"]["gate"]["passed"] is True
        # the operator keeps the run report beside the artifacts, current with the final status
        page = wait_for("the final report", lambda: (b := store.read_bytes("report.html").decode()) and
                        "DistillationRun <code>sample</code>" in b and "Succeeded</span> ·" in b and b, 60)
        assert "Gate (<code>evaluation.minMacroF1</code> 0.0): <span class='ok'>passed" in page
        assert store.read_json(f"evaluate/{MANIFEST}")["digest"] in page  # lineage

        # `kubedistill status NAME` reads the same status from the cluster
        out = subprocess.run([sys.executable, "-m", "kubedistill.cli", "status", "sample"], capture_output=True, text=True,
                             env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "run default/sample: Succeeded"
        assert any(line.split()[:2] == ["student-crsd", "Succeeded"] for line in out.stdout.splitlines())
        assert "s3://kd-e2e-run/runs/sample/ (report.html)" in out.stdout

        jobs, services = cluster.children("rayjobs"), cluster.children("rayservices")
        assert sorted(j["metadata"]["name"] for j in jobs) == ["sample-data", "sample-evaluate", "sample-student-crsd"]
        assert [s["metadata"]["name"] for s in services] == ["sample-serve"]
        for child in jobs + services:  # what the garbage collector follows when the run is deleted
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("DistillationRun", "sample", uid, True)
        reasons = collections.Counter(e["reason"] for e in cluster.events())
        assert reasons["StageRetrying"] == 1 and reasons["StageSucceeded"] >= 3, reasons

        # the RayService serves the student that was trained
        code, answer = post_json(f"http://127.0.0.1:{serve_port}/score", {
            "query": "vegan brunch", "services": [{"id": "s1", "text": "Green Fork | restaurant | offers vegan brunch"}]})
        assert code == 200 and answer["results"][0]["id"] == "s1"
        student = store.read_json(f"student-crsd/{MANIFEST}")
        runtime = store.read_json(f"evaluate/{MANIFEST}")["outputs"]["runtime"]  # the fastest whose check passed
        assert answer["modelVersion"] == f"ce-{student['version'][:12]}+{runtime}"
        assert _served_model(cluster) == student["outputs"]["model"] == f"{student['artifact']}/model"

        # an edit of the student: it and everything downstream rerun (data stays done), the service rolls to
        # the new student version only after it passed the gate, and the old version's files are still there
        ran = len(kuberay.submitted)
        cluster.api.call("PATCH", f"{RUNS}/sample", {"spec": {"student": {"seed": 5}}})
        run = wait_for("the edited run to finish", lambda: (r := cluster.run("sample")) and
                       r["status"].get("observedGeneration") == 2 and r["status"]["phase"] in ("Succeeded", "Failed")
                       and r, 600, logs=cluster.operator_logs)
        assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
        assert sorted(n for n, _ in kuberay.submitted[ran:]) == ["sample-evaluate", "sample-student-crsd"]
        rebuilt = store.read_json(f"student-crsd/{MANIFEST}")
        assert rebuilt["version"] != student["version"] and store.exists(f"student-crsd/v-{student['version']}/model/student.json")
        assert _served_model(cluster) == rebuilt["outputs"]["model"]
        assert store.read_json("_PROMOTED.json")["version"] == rebuilt["version"]
        def served_version() -> str | None:
            try:
                return post_json(f"http://127.0.0.1:{serve_port}/score", {
                    "query": "vegan brunch", "services": [{"id": "s1", "text": "Green Fork"}]})[1].get("modelVersion")
            except OSError:  # the proxy between two deployments
                return None

        runtime = store.read_json(f"evaluate/{MANIFEST}")["outputs"]["runtime"]
        wait_for("the new version to answer", lambda: served_version() == f"ce-{rebuilt['version'][:12]}+{runtime}", 120)

        # deletion: nothing holds the run (no finalizer) and its children point at it
        cluster.api.call("DELETE", "/apis/kubedistill.io/v1alpha1/namespaces/default/distillationruns/sample")
        wait_for("the run to be released", lambda: cluster.run("sample") is None, 60, logs=cluster.operator_logs)
        assert cluster.operators[-1].alive()


def test_failures_end_in_status_with_the_field_while_other_runs_proceed(cluster, ray_dashboard, seaweed, tiny_encoder):
    seaweed.create_bucket("kd-e2e-fail")
    cluster.secret("default", "s3-credentials", s3_secret())
    cluster.secret("default", "not-for-storage", s3_secret(), opt_in=False)
    with KubeRay(cluster.api, ray_dashboard, free_port()) as kuberay:
        cluster.start_operator(allowed_endpoints=seaweed.endpoint)
        # invalid beyond what a schema checks: annotation without a teacher or a model, a cross-field rule
        cluster.apply(_doc("nomodel", "kd-e2e-fail", seaweed.endpoint, tiny_encoder, annotation={"enabled": True}))
        cluster.apply(_doc("crossfield", "kd-e2e-fail", seaweed.endpoint, tiny_encoder,
                           serving={"maxServices": 100, "maxBatchPairs": 10}))
        # valid, but its logs do not exist: fails for real, is retried once, then fails the run
        cluster.apply(_doc("nologs", "kd-e2e-fail", seaweed.endpoint, tiny_encoder,
                           data={"logs": "s3://kd-e2e-fail/missing/", "evalSet": "s3://kd-e2e-fail/missing/eval.jsonl",
                                 "sftSeed": "s3://kd-e2e-fail/missing/sft.jsonl"},
                           ray={"stageRetries": 1, "retryBackoffSeconds": 1}))
        # its storage secret does not exist: a condition naming the field, retried, nothing created
        cluster.apply(_doc("nosecret", "kd-e2e-fail", seaweed.endpoint, tiny_encoder,
                           storage={"uri": "s3://kd-e2e-fail/runs", "endpoint": seaweed.endpoint,
                                    "secretRef": {"name": "no-such-secret"}}))
        # a Secret that did not opt in: refused, nothing created
        cluster.apply(_doc("notoptedin", "kd-e2e-fail", seaweed.endpoint, tiny_encoder,
                           storage={"uri": "s3://kd-e2e-fail/runs", "endpoint": seaweed.endpoint,
                                    "secretRef": {"name": "not-for-storage"}}))
        for name, says in (("nomodel", "spec.annotation.model"), ("crossfield", "maxBatchPairs")):
            run = wait_for(f"{name} to fail", cluster.phase(name, "Failed"), 60, logs=cluster.operator_logs)
            valid = _condition(run, "Valid")
            assert valid["status"] == "False" and says in valid["message"], valid
        run = wait_for("nologs to fail", cluster.phase("nologs", "Failed"), 300, logs=cluster.operator_logs)
        data = _stage(run, "data")
        assert data["attempts"] == 2 and "spec.data" in data["message"], data
        assert _condition(run, "Ready")["message"].startswith("data: ")
        assert [n for n, _ in kuberay.submitted] == ["nologs-data", "nologs-data"]
        # each failed attempt's driver log is in storage (read after the cluster is gone), the report links it
        store = Storage("s3://kd-e2e-fail/runs/nologs", S3Options(seaweed.endpoint, "us-east-1", ACCESS_KEY, SECRET_KEY))
        logs = store.list("data/logs")
        assert len(logs) == 2 and all("spec.data" in store.read_text(log) and "Traceback" in store.read_text(log)
                                      for log in logs), logs
        page = wait_for("the failed run's report", lambda: store.exists("report.html") and
                        (b := store.read_text("report.html")) and "Failed</span> ·" in b and b, 60)
        assert f"<a href='{max(logs)}'>latest</a>" in page
        assert {j["metadata"]["name"] for j in cluster.children("rayjobs")} == {"nologs-data"}  # nothing after it
        storage = _condition(cluster.run("nosecret"), "StorageReachable")
        assert storage["status"] == "False" and storage["reason"] == "SecretMissing"
        assert "spec.storage.secretRef" in storage["message"] and "no-such-secret" in storage["message"]
        storage = _condition(cluster.run("notoptedin"), "StorageReachable")
        assert storage["reason"] == "StorageRefused" and "kubedistill.io/storage-credentials=true" in storage["message"]
        # the run that ran got its Ray token Secret and NetworkPolicy before its first RayJob; the refused ones none
        secrets = {s["metadata"]["name"] for s in cluster.api.items("/api/v1/namespaces/default/secrets")}
        policies = cluster.api.items("/apis/networking.k8s.io/v1/namespaces/default/networkpolicies")
        assert "nologs-ray-token" in secrets and not {"nosecret-ray-token", "notoptedin-ray-token"} & secrets
        assert [p["metadata"]["name"] for p in policies] == ["nologs-ray"]
        assert policies[0]["spec"]["podSelector"] == {"matchLabels": {"kubedistill.io/run": "nologs"}}
        assert cluster.operators[-1].alive()


def test_without_kuberay_the_run_says_what_to_install_and_the_operator_stays_up(cluster_without_kuberay, tmp_path):
    c = cluster_without_kuberay
    c.start_operator()
    c.apply(_doc("waiting", "unused", "http://127.0.0.1:1", "unused", storage={"uri": str(tmp_path / "store")}))
    run = wait_for("the KubeRay condition", lambda: (r := c.run("waiting")) and r.get("status") and
                   _condition(r, "KubeRayAvailable") and r, 60, logs=c.operator_logs)
    cond = _condition(run, "KubeRayAvailable")
    assert cond["status"] == "False" and cond["reason"] == "KubeRayMissing" and "install the KubeRay operator" in cond["message"]
    assert run["status"]["phase"] == "Pending"

    def reconciles() -> float:
        text = urllib.request.urlopen(c.metrics, timeout=10).read().decode()
        line = next((x for x in text.splitlines()
                     if x.startswith('kubedistill_operator_reconciles_total{result="kuberay-missing"}')), None)
        return float(line.split()[-1]) if line else 0.0

    wait_for("repeated reconciles", lambda: reconciles() >= 3, 30)  # still trying, not crash-looping
    assert urllib.request.urlopen(c.liveness, timeout=10).status == 200 and c.operators[0].alive()


def test_a_rayjob_completing_is_acted_on_at_once_not_at_a_timer(cluster, seaweed, monkeypatch):
    """The operator reconciles on watch events: with its resync and retry timers an hour away, a stage's
    RayJob turning Complete starts the next stage within 2 s. The stages' work is written to storage here, as
    the stages would write it; the RayJobs' status is set as KubeRay sets it."""
    import time

    from kubedistill.core import pipeline, spec, stage

    for k, v in s3_secret().items():
        monkeypatch.setenv(k, v)
    seaweed.create_bucket("kd-e2e-events")
    cluster.secret("default", "s3-credentials", s3_secret())
    cluster.start_operator(allowed_endpoints=seaweed.endpoint, resync=3600, retry=3600, progress=3600)
    doc = _doc("quick", "kd-e2e-events", seaweed.endpoint, "unused")
    stages = {s.name: s for s in pipeline.build(spec.parse_run(doc))}

    def done(name: str) -> None:  # what the stage's job leaves in storage before it exits
        s = stages[name]
        stage.execute(stage.StageContext(s.config, stage.run_storage(s.config)), lambda ctx: {"metrics": {}})

    done("data")
    cluster.apply(doc)
    student = wait_for("the student's RayJob", lambda: cluster.api.get(
        "/apis/ray.io/v1/namespaces/default/rayjobs/quick-student-crsd"), 60, every=0.05, logs=cluster.operator_logs)
    wait_for("the run Running", cluster.phase("quick", "Running"), 30, logs=cluster.operator_logs)
    assert student["spec"]["entrypoint"]
    done("student-crsd")
    t0 = time.monotonic()
    cluster.api.call("PATCH", "/apis/ray.io/v1/namespaces/default/rayjobs/quick-student-crsd/status", {"status": {
        "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
    wait_for("the evaluate RayJob", lambda: cluster.api.get("/apis/ray.io/v1/namespaces/default/rayjobs/quick-evaluate"),
             30, every=0.02, logs=cluster.operator_logs)
    took = time.monotonic() - t0
    assert took <= 2.0, f"acted on after {took:.2f} s"
    run = wait_for("the student Succeeded in status", lambda: (r := cluster.run("quick")) and
                   _stage(r, "student-crsd")["phase"] == "Succeeded" and r, 10, every=0.05)
    assert _stage(run, "evaluate")["phase"] == "Running"


@pytest.mark.cost(150)
def test_a_queued_run_waits_for_kueue_and_shows_its_progress(cluster, ray_dashboard, seaweed, tiny_encoder):
    """`spec.ray.queueName`: every RayJob is created suspended on the LocalQueue, its stage Queued (the run too,
    the Progress column says where) until Kueue admits it (the test unsuspends it, as Kueue does); a running
    stage's progress reaches the run's status (the student's first attempt held at a checkpoint, so it is
    running for as long as the test looks); the evicted attempt's retry is queued again and the run finishes."""
    seaweed.create_bucket("kd-e2e-queue")
    cluster.secret("default", "s3-credentials", s3_secret())
    jobs = "/apis/ray.io/v1/namespaces/default/rayjobs"

    def admit(name: str) -> None:  # what Kueue does when the LocalQueue has room: unsuspend the job
        cluster.api.call("PATCH", f"{jobs}/{name}", {"spec": {"suspend": False}})

    def queued(stage: str, attempts: int = 1):
        def check():
            r = cluster.run("queued")
            if not (r and r.get("status")):
                return None
            st = _stage(r, stage)
            return r if (st["phase"], st["attempts"]) == ("Queued", attempts) and r["status"]["phase"] == "Queued" \
                else None
        return check

    with KubeRay(cluster.api, ray_dashboard, free_port(), evict_at={"student-crsd": "train.checkpoint-reported"},
                 holds=cluster.tmp / "holds-queue", evict_on_request=True) as kuberay:
        cluster.start_operator(allowed_endpoints=seaweed.endpoint, progress=1.0)
        cluster.apply(_doc("queued", "kd-e2e-queue", seaweed.endpoint, tiny_encoder,
                           serving={"enabled": False},
                           ray={"queueName": "team-a", "priorityClassName": "batch-low", "stageRetries": 1,
                                "retryBackoffSeconds": 1}))
        run = wait_for("data Queued", queued("data"), 60, logs=cluster.operator_logs)
        assert run["status"]["progress"] == "data queued in team-a"
        assert _condition(run, "Ready")["reason"] == "StageQueued"
        assert "LocalQueue team-a" in _stage(run, "data")["message"]
        # the run says Queued once the operator created the job suspended; KubeRay writes the job's own status on
        # its next reconcile, which may come after: wait for it rather than race it
        def suspended():
            j = cluster.api.get(f"{jobs}/queued-data")
            return j if j.get("status", {}).get("jobDeploymentStatus") == "Suspended" else None

        job = wait_for("the RayJob's status Suspended", suspended, 30, logs=cluster.operator_logs)
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "batch-low"
        assert kuberay.submitted == []  # nothing runs before admission
        admit("queued-data")
        wait_for("student Queued", queued("student-crsd"), 120, logs=cluster.operator_logs)
        assert _stage(cluster.run("queued"), "data")["phase"] == "Succeeded"
        admit("queued-student-crsd")
        wait_for("the student held at a checkpoint", lambda: kuberay.held("student-crsd"), 180,
                 logs=lambda: cluster.operator_logs() + f"\nstand-in errors: {kuberay.errors[-5:]}")
        # the training loop's report (before it, the stage's own heartbeat may say "running 25s")
        run = wait_for("step progress in the run's status", lambda: (r := cluster.run("queued")) and
                       (_stage(r, "student-crsd").get("progress") or {}).get("unit") == "steps" and r, 120,
                       logs=cluster.operator_logs)
        st, progress = _stage(run, "student-crsd"), _stage(run, "student-crsd")["progress"]
        assert st["phase"] == "Running" and run["status"]["phase"] == "Running"
        assert progress["unit"] == "steps" and 0 < progress["done"] <= progress["total"], progress
        assert progress["updatedAt"] >= st["startedAt"] and "loss" in progress["metrics"]
        assert run["status"]["progress"].startswith(f"student-crsd {progress['done']:g}/{progress['total']:g} steps")
        kuberay.evict("student-crsd")
        wait_for("the retry Queued", queued("student-crsd", attempts=2), 120, logs=cluster.operator_logs)
        admit("queued-student-crsd")
        wait_for("evaluate Queued", queued("evaluate"), 300, logs=cluster.operator_logs)
        admit("queued-evaluate")
        run = wait_for("the run to finish", cluster.phase("queued", "Succeeded", "Failed"), 300,
                       logs=cluster.operator_logs)
        assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
        assert run["status"].get("progress") is None and all(s.get("progress") is None for s in run["status"]["stages"])
        assert not kuberay.errors, kuberay.errors
        reasons = collections.Counter(e["reason"] for e in cluster.events())
        assert reasons["StageQueued"] == 4, reasons  # data, student (twice), evaluate
