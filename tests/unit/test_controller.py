"""The operator's I/O helpers that need no API server: blocking conditions and the manifest reader."""

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
    st.write_json("data/_SUCCESS.json", {"configHash": "abc"})
    read = controller.manifest_reader(st)
    assert read("data") == {"configHash": "abc"} and read("evaluate") is None
    st.write_json("evaluate/_SUCCESS.json", {"configHash": "def"})
    st.delete("data/_SUCCESS.json")
    assert read("data") == {"configHash": "abc"} and read("evaluate") is None  # one reconcile, one view
    assert controller.manifest_reader(st)("evaluate") == {"configHash": "def"}


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
    reading a manifest: not torch, numpy, scikit-learn, FastAPI or Ray (pyarrow stays, without numpy: the
    manifests are read through its S3 filesystem, as the stages write them)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = (
        "import runpy, sys, tempfile; runpy.run_path('operator/handlers.py', run_name='handlers'); "
        "from kubedistill.cluster import k8s, reconcile; from kubedistill.core import spec, stage, storage; "
        "run = spec.parse_run({'apiVersion': 'kubedistill.io/v1alpha1', 'kind': 'DistillationRun', "
        "'metadata': {'name': 'r'}, 'spec': {'storage': {'uri': 's3://b/runs'}}}); k8s.render(run, uid='u'); "
        "st = storage.Storage(tempfile.mkdtemp()); st.write_json('data/_SUCCESS.json', {'digest': 'd'}); "
        "assert stage.read_manifest(st, 'data') == {'digest': 'd'}; "
        "heavy = ('torch', 'numpy', 'sklearn', 'scipy', 'pandas', 'fastapi', 'starlette', 'ray', 'transformers', "
        "'vllm', 'matplotlib', 'peft'); print(sorted(m for m in heavy if sys.modules.get(m) is not None))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
