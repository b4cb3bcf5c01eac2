"""Pure KubeRay builders: names, labels, owner references, the student's RayService, status mapping."""

import importlib

import pytest
import yaml

from kubedistill.cluster import k8s
from kubedistill.core import spec
from kubedistill.stages import serving
from tests.conftest import minimal_doc
from tests.kuberay import errors

MODEL = "s3://artifacts/runs/r1/student-crsd/model"


def _run(**spec_fields) -> spec.DistillationRun:
    doc = minimal_doc(storage={"uri": "s3://artifacts/runs", "endpoint": "http://minio:9000",
                               "secretRef": {"name": "s3-credentials"}}, **spec_fields)
    doc["metadata"] = {"name": "r1", "namespace": "ml"}
    return spec.parse_run(doc)


def test_child_names_are_deterministic_and_fit_47_characters():
    assert k8s.child_name("r1", "serve") == "r1-serve"
    long_a, long_b = "a" * 60, "a" * 59 + "b"
    a, b = k8s.child_name(long_a, "student-crsd"), k8s.child_name(long_b, "student-crsd")
    assert len(a) == len(b) == 47 and a != b and a == k8s.child_name(long_a, "student-crsd")
    assert a[-9] == "-" and not a.startswith("-")


def test_rayservice_validates_against_kuberay_and_carries_the_serving_spec():
    run = _run(serving={"replicas": {"min": 2, "max": 6}, "maxServices": 50, "cpusPerReplica": 2})
    obj = k8s.rayservice(run, MODEL, "torch", uid="uid-123")
    assert errors(obj) == []
    assert obj["metadata"]["name"] == "r1-serve" and obj["metadata"]["namespace"] == "ml"
    assert obj["metadata"]["labels"]["kubedistill.io/run"] == "r1"
    (owner,) = obj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("DistillationRun", "r1", "uid-123", True)
    cluster = obj["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 6)
    assert cluster["enableInTreeAutoscaling"] is True
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"]["cpu"] == "2" and group["rayStartParams"]["num-cpus"] == "2"
    assert "envFrom" not in worker  # only the credential keys, one by one
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in worker["env"]}
    assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert {r["name"] for r in refs.values()} == {"s3-credentials"} and refs["AWS_SESSION_TOKEN"]["optional"]
    assert worker["image"] == k8s.Images.release().cpu and cluster["rayVersion"] == run.spec.ray.ray_version
    head_ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == 8000


def test_serve_config_is_valid_for_ray_serve_and_is_the_local_apps_args():
    from ray.serve.schema import ServeDeploySchema

    run = _run(serving={"maxServices": 50, "batchWaitMs": 1})
    text = k8s.rayservice(run, MODEL, "onnx-int8")["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert app.import_path == "ray_apps.student:app" and app.route_prefix == "/"
    args = serving.AppArgs.model_validate(app.args)
    # every field from where it is written: the spec's serving block (set and default), the model, the storage
    assert (args.model, args.runtime, args.max_services, args.batch_wait_ms) == (MODEL, "onnx-int8", 50, 1)
    assert args.replicas.max == spec.ServingSpec().replicas.max and args.max_batch_pairs == spec.ServingSpec().max_batch_pairs
    assert args.storage_endpoint == "http://minio:9000" and args.storage_region is None  # none in the spec: the pod's $AWS_REGION decides
    module, attr = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is serving.build_app


def test_no_owner_reference_without_a_uid_and_gpus_become_limits():
    obj = k8s.rayservice(_run(serving={"gpusPerReplica": 1, "cpusPerReplica": 0.5}), MODEL, "torch")
    assert "ownerReferences" not in obj["metadata"]
    assert errors(obj) == []
    group = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    c = group["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["cpu"] == "500m"
    assert group["rayStartParams"] == {"num-cpus": "1", "num-gpus": "1"}


def test_the_schema_check_catches_a_typo():
    obj = k8s.rayservice(_run(), MODEL, "torch")
    obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in errors(obj))


@pytest.mark.parametrize(
    ("status", "phase", "says"),
    [
        ({}, "Running", "waiting"),
        ({"conditions": [{"type": "Ready", "status": "True", "reason": "RayServiceReady", "message": ""}]}, "Succeeded", None),
        ({"conditions": [{"type": "Ready", "status": "False", "reason": "Initializing", "message": "cluster starting"}]},
         "Running", "cluster starting"),
        ({"activeServiceStatus": {"applicationStatuses": {"student": {"status": "DEPLOY_FAILED",
                                                                      "message": "model: no student artifact"}}}},
         "Failed", "DEPLOY_FAILED: model: no student artifact"),
        ({"pendingServiceStatus": {"applicationStatuses": {"student": {"status": "UNHEALTHY"}}},
          "conditions": [{"type": "Ready", "status": "True"}]}, "Failed", "UNHEALTHY"),
    ],
)
def test_rayservice_status_to_stage_phase(status, phase, says):
    got, message = k8s.rayservice_phase({"status": status})
    assert got == phase
    assert (says is None and message is None) or says in message


def _full_run(**spec_fields) -> spec.DistillationRun:
    return _run(annotation={"replicas": {"min": 1, "max": 8}, "gpusPerReplica": 1},
                student={"resources": {"workers": 4, "cpusPerWorker": 2, "gpusPerWorker": 1, "memory": "16Gi"}},
                **spec_fields)


def test_every_rendered_object_validates_and_follows_the_stage_graph():
    from kubedistill.core import pipeline

    run = _full_run()
    objs = k8s.render(run, uid="u1")
    stages = pipeline.build(run)
    assert [o["metadata"]["labels"]["kubedistill.io/stage"] for o in objs] == [s.name for s in stages] + ["ray"]
    assert [o["kind"] for o in objs] == ["RayJob"] * (len(stages) - 1) + ["RayService", "NetworkPolicy"]
    for o in objs:
        assert errors(o) == [], o["metadata"]["name"]
        assert len(o["metadata"]["name"]) <= 47 and o["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert k8s.render(run, uid="u1") == objs  # deterministic


def test_rayjob_carries_the_config_as_json_in_an_env_var_never_in_the_entrypoint():
    import json

    from kubedistill.core import pipeline
    from kubedistill.core.stage import CONFIG_ENV

    hostile = "s3://bucket/$(rm -rf /); echo `id`"
    run = spec.parse_run(minimal_doc(storage={"uri": hostile}))
    stage = next(s for s in pipeline.build(run) if s.name == "student-crsd")
    job = k8s.rayjob(run, stage)
    assert job["spec"]["entrypoint"] == "python -m kubedistill.job kubedistill.stages.student:run_stage"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert json.loads(env[CONFIG_ENV]) == stage.config and json.loads(env[CONFIG_ENV])["storage"]["uri"] == hostile
    assert job["metadata"]["annotations"]["kubedistill.io/config-hash"] == stage.config_hash
    assert job["metadata"]["annotations"]["kubedistill.io/attempt"] == "1"
    # the operator retries (with backoff); KubeRay must not retry underneath it
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (0, 86400)
    assert errors(job) == []


def test_rayjob_workers_follow_the_stage_resources_and_annotate_autoscales():
    from kubedistill.core import pipeline

    run = _full_run()
    stages = {s.name: s for s in pipeline.build(run)}
    student = k8s.rayjob(run, stages["student-crsd"])["spec"]["rayClusterSpec"]
    (g,) = student["workerGroupSpecs"]
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (4, 4, 4) and not student["enableInTreeAutoscaling"]
    c = g["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": 1}
    annotate = k8s.rayjob(run, stages["annotate"])["spec"]["rayClusterSpec"]
    (g,) = annotate["workerGroupSpecs"]
    assert (g["minReplicas"], g["maxReplicas"]) == (1, 8) and annotate["enableInTreeAutoscaling"]


@pytest.mark.parametrize(
    ("status", "phase", "says"),
    [
        ({}, "Running", "waiting"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running", "RUNNING"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded", None),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "stage failed: bad"}, "Failed", "bad"),
        ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed", "DeadlineExceeded"),
        ({"jobDeploymentStatus": "ValidationFailed", "message": "spec.x: bad"}, "Failed", "spec.x: bad"),
        ({"jobDeploymentStatus": "Suspended", "jobStatus": ""}, "Queued", "suspended"),
        ({"jobDeploymentStatus": "Suspending"}, "Queued", "suspended"),  # Kueue preempted it
    ],
)
def test_rayjob_status_to_stage_phase(status, phase, says):
    got, message = k8s.rayjob_phase({"status": status})
    assert got == phase
    assert (says is None and message is None) or says in message


def test_stage_pods_run_the_operators_image_unless_the_run_names_one():
    from kubedistill.cluster.controller import images_from_env
    from kubedistill.core import pipeline

    images = images_from_env({"KUBEDISTILL_STAGE_IMAGE": "reg/kd:9", "KUBEDISTILL_STAGE_IMAGE_GPU": "reg/kd:9-gpu"})
    run = _full_run()  # student workers and annotate replicas have GPUs; data does not
    by = {s.name: s for s in pipeline.build(run)}

    def pod_images(obj):
        spec_ = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
        groups = [spec_["headGroupSpec"], *spec_["workerGroupSpecs"]]
        return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}

    assert pod_images(k8s.rayjob(run, by["data"], images=images)) == {"reg/kd:9"}
    assert pod_images(k8s.rayjob(run, by["student-crsd"], images=images)) == {"reg/kd:9-gpu"}
    named = _full_run(ray={"image": "mine/kd:1"})
    assert pod_images(k8s.rayjob(named, by["student-crsd"], images=images)) == {"mine/kd:1"}
    release = k8s.Images.release()  # `kubedistill render`: this release's published images
    assert pod_images(k8s.rayjob(run, by["data"])) == {release.cpu} and release.cpu.startswith(k8s.IMAGE_REPOSITORY)
    assert images_from_env({}) == release
    assert images_from_env({"KUBEDISTILL_STAGE_IMAGE": "reg/kd:9"}) == k8s.Images("reg/kd:9", "reg/kd:9")
    def service_hash(imgs):
        return k8s.rayservice(run, MODEL, "torch", images=imgs)["metadata"]["annotations"]["kubedistill.io/config-hash"]

    assert service_hash(images) != service_hash(k8s.Images("reg/kd:10", "reg/kd:10-gpu"))  # a new image rolls it


def test_a_queued_run_puts_every_rayjob_on_its_kueue_localqueue_suspended():
    """Kueue's RayJob integration: the queue-name label (and its WorkloadPriorityClass label) on the RayJob,
    created suspended; valid for KubeRay's schema. Without a queue: neither, and the job starts at once."""
    doc = minimal_doc(storage={"uri": "s3://b/runs"}, ray={"queueName": "team-a", "priorityClassName": "batch-low"})
    run = spec.parse_run(doc)
    jobs = [o for o in k8s.render(run, "uid-1") if o["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        assert errors(job) == []
        assert job["spec"]["suspend"] is True and job["spec"]["shutdownAfterJobFinishes"] is True  # Kueue needs both
        labels = job["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "batch-low"
        phase, message = k8s.rayjob_phase(job)  # as created, before KubeRay wrote a status
        assert phase == "Queued" and message == "waiting for Kueue to admit it to LocalQueue team-a"
    plain = [o for o in k8s.render(spec.parse_run(minimal_doc(storage={"uri": "s3://b/runs"})), "u") if o["kind"] == "RayJob"]
    assert all("suspend" not in j["spec"] and not any(k.startswith("kueue") for k in j["metadata"]["labels"])
               for j in plain)
    admitted = {**jobs[0], "spec": {**jobs[0]["spec"], "suspend": False}, "status": {"jobDeploymentStatus": "Initializing"}}
    assert k8s.rayjob_phase(admitted)[0] == "Running"


def test_a_priority_without_a_queue_is_refused_naming_the_field():
    with pytest.raises(spec.SpecError) as e:
        spec.parse_run(minimal_doc(ray={"priorityClassName": "batch-low"}))
    assert "spec.ray.priorityClassName" in str(e.value) and "queueName" in str(e.value)
    with pytest.raises(spec.SpecError) as e:
        spec.parse_run(minimal_doc(ray={"queueName": "Team_A"}))
    assert "spec.ray.queueName" in str(e.value)


def test_the_job_environment_turns_off_ray_trains_duplicate_print():
    """Ray Train prints a worker's print *and* logs it: every worker line reached the job log twice."""
    run = spec.parse_run(minimal_doc(storage={"uri": "s3://b/runs"}))
    (job, *_) = [o for o in k8s.render(run, "u") if o["kind"] == "RayJob"]
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
