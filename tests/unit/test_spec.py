import textwrap

import pytest

from kubedistill.core import spec
from tests.conftest import SAMPLES, minimal_doc


def test_minimal_resource_is_valid_and_enables_everything():
    run = spec.parse_run(minimal_doc())
    s = run.spec
    assert s.labels == ["irrelevant", "partial", "relevant"]
    assert s.teacher.enabled and s.annotation.enabled and s.student.enabled
    assert s.pruning.enabled and s.serving.enabled
    assert s.student.objective == "crsd"
    assert s.serving.replicas.min == 1 and s.serving.replicas.max == 4


def test_storage_is_required():
    doc = minimal_doc()
    del doc["spec"]["storage"]
    with pytest.raises(spec.SpecError) as e:
        spec.parse_run(doc)
    assert [str(p) for p in e.value.problems] == ["spec.storage: Field required"]


def test_three_mistakes_are_all_reported_with_field_paths(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(textwrap.dedent("""
        apiVersion: kubedistill.io/v1alpha1
        kind: DistillationRun
        metadata: {name: bad}
        spec:
          storage: {uri: ./runs}
          teacher:
            dpo: {beta: -1}
          annotation:
            replicas: {min: 1, max: 2}
            engine: tensorrt
          student:
            crsd: {temprature: 0.1}
        """))
    with pytest.raises(spec.SpecError) as e:
        spec.load_runs(f)
    paths = [p.path for p in e.value.problems]
    assert paths == ["spec.teacher.dpo.beta", "spec.annotation.engine", "spec.student.crsd.temprature"]
    text = str(e.value)
    assert "greater than 0" in text and "tensorrt" in text and "unknown field" in text


def test_unknown_top_level_and_nested_fields_are_errors():
    with pytest.raises(spec.SpecError) as e:
        spec.parse_run(minimal_doc(extra=1, serving={"enabled": True, "replcas": {}}))
    assert {p.path for p in e.value.problems} == {"spec.extra", "spec.serving.replcas"}


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"labels": ["only"]}, "spec.labels"),
        ({"labels": ["a", "a"]}, "spec.labels"),
        ({"labels": ["Bad Label", "ok"]}, "spec.labels"),
        ({"teacher": {"rewardModel": {"dimensions": {"label": 1, "fluency": 1}}}}, "spec.teacher.rewardModel.dimensions"),
        ({"pruning": {"targetRatio": 1.0}}, "spec.pruning.targetRatio"),
        ({"serving": {"replicas": {"min": 3, "max": 2}}}, "spec.serving.replicas.min"),
        ({"serving": {"enabled": True}, "student": {"enabled": False}}, "spec.serving.enabled"),
        ({"teacher": {"enabled": False}, "pruning": {"enabled": False}}, "spec.annotation.model"),
        ({"data": {"logs": "s3://b/logs/"}}, "spec.data.evalSet"),
        ({"student": {"objective": "crsd", "compareObjectives": ["ce", "crsd"]}}, "spec.student.compareObjectives"),
        ({"student": {"compareObjectives": ["ce", "ce"]}}, "spec.student.compareObjectives"),
        ({"student": {"compareObjectives": ["mse"]}}, "spec.student.compareObjectives[0]"),
        ({"teacher": {"dpo": {"prompts": 0}}}, "spec.teacher.dpo.prompts"),
        ({"teacher": {"dpo": {"prefer": "oracle"}}}, "spec.teacher.dpo.prefer"),
        ({"teacher": {"rewardModel": {"ownAnswers": 100, "dimensions": {"format": 1}}}}, "spec.teacher.rewardModel.ownAnswers"),
        ({"teacher": {"enabled": False}, "annotation": {"model": "s3://m/llm"}}, "spec.pruning.enabled"),
        ({"annotation": {"model": "prune-search"}, "pruning": {"enabled": False}}, "spec.annotation.model"),
        ({"data": {"logs": "s3://b/logs/", "evalSet": "s3://b/eval/"}, "teacher": {"enabled": False},
          "annotation": {"model": "s3://m/llm"}, "pruning": {"model": "s3://m/llm"}}, "spec.pruning.recovery.enabled"),
        ({"pruning": {"objective": "accuracy"}}, "spec.pruning.objective"),
        ({"pruning": {"recovery": {"steps": 0}}}, "spec.pruning.recovery.steps"),
        ({"teacher": {"maxNewTokens": 4}}, "spec.teacher.maxNewTokens"),
        ({"teacher": {"preferenceHoldout": 0.6}}, "spec.teacher.preferenceHoldout"),
    ],
)
def test_invalid_values_name_their_field(patch, path):
    with pytest.raises(spec.SpecError) as e:
        spec.parse_run(minimal_doc(**patch))
    assert path in [p.path for p in e.value.problems], e.value.problems


def test_kd_needs_the_annotate_stages_votes_and_says_where_to_set_them():
    """Objective kd learns the teacher's label distribution, which only annotate's votes write."""
    def problems(**patch):
        try:
            spec.parse_run(minimal_doc(**patch))
        except spec.SpecError as e:
            return {p.path: p.message for p in e.problems}
        return {}

    no_votes = problems(student={"objective": "kd"})
    assert list(no_votes) == ["spec.annotation.votes"] and "set votes >= 1" in no_votes["spec.annotation.votes"]
    assert "compareObjectives" in problems(student={"compareObjectives": ["kd"]})["spec.annotation.votes"]
    assert problems(student={"objective": "kd"}, annotation={"votes": 4}) == {}
    assert problems(student={"objective": "ce", "compareObjectives": ["kd"]}, annotation={"votes": 1}) == {}
    # labeled pairs carry one label: kd cannot learn from them, votes or not
    for train_on in ("labels", "both"):
        got = problems(student={"objective": "kd", "trainOn": train_on}, annotation={"votes": 4})
        assert list(got) == ["spec.student.objective"] and f"trains on {train_on}" in got["spec.student.objective"]
    got = problems(student={"objective": "kd"}, annotation={"enabled": False}, teacher={"enabled": False},
                   pruning={"enabled": False})
    assert "trains on labels" in got["spec.student.objective"]  # trainOn auto without annotations reads labels
    # votes belong to the annotate stage: rationalize alone keeps the human labels
    assert "mode label or both" in problems(annotation={"votes": 2, "mode": "rationalize"})["spec.annotation.votes"]
    assert problems(annotation={"votes": 2, "mode": "both"}) == {}
    assert "spec.annotation.votes" in problems(annotation={"votes": 17})  # at most 16


def test_bad_name_and_kind():
    doc = minimal_doc()
    doc["metadata"]["name"] = "Not_A_Name"
    doc["kind"] = "RayJob"
    with pytest.raises(spec.SpecError) as e:
        spec.parse_run(doc)
    assert {p.path for p in e.value.problems} == {"kind", "metadata.name"}


def test_yaml_errors_and_non_mappings(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("spec: [unclosed")
    with pytest.raises(spec.SpecError, match="<yaml>"):
        spec.load_runs(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(spec.SpecError, match="expected a mapping"):
        spec.load_runs(f)
    with pytest.raises(spec.SpecError, match="cannot read"):
        spec.load_runs(tmp_path / "missing.yaml")


def test_multi_document_file_prefixes_problems(tmp_path):
    import yaml

    bad = minimal_doc(labels=["x"])
    f = tmp_path / "two.yaml"
    f.write_text(yaml.safe_dump_all([minimal_doc(), bad]))
    with pytest.raises(spec.SpecError) as e:
        spec.load_runs(f)
    assert [p.path for p in e.value.problems] == ["[document 1] spec.labels"]


def test_every_sample_validates_runs_in_this_version_and_renders_valid_kuberay_objects():
    from kubedistill.cluster import k8s
    from tests.kuberay import errors

    samples = sorted(SAMPLES.glob("*.yaml"))
    assert {f.name for f in samples} >= {"quickstart.yaml", "production-gpu.yaml", "train-only.yaml"}
    for f in samples:
        for run in spec.load_runs(f):
            objs = k8s.render(run, uid="00000000-0000-0000-0000-000000000001")
            assert all(errors(o) == [] for o in objs), f.name
            if f.name != "quickstart.yaml":  # cluster samples: artifacts on S3, pods on a kubedistill image
                assert run.spec.storage.uri.startswith("s3://")
                images = {c["image"] for o in objs for c in _containers(o)}
                assert images and all(i.startswith("ghcr.io/kubedistill/kubedistill:") for i in images), images


def _containers(obj):
    from tests.kuberay import pod_templates

    if obj["kind"] in ("RayJob", "RayService"):
        for _, template in pod_templates(obj):
            yield from template["spec"]["containers"]


def test_the_gpu_sample_asks_for_gpus_where_it_trains_and_serves():
    from kubedistill.cluster import k8s

    (run,) = spec.load_runs(SAMPLES / "production-gpu.yaml")
    objs = {o["metadata"]["name"]: o for o in k8s.render(run)}
    worker = objs["relevance-2026w48-student-crsd"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 4
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    serve = objs["relevance-2026w48-serve"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (serve["minReplicas"], serve["maxReplicas"]) == (2, 8)
    ann = objs["relevance-2026w48-annotate"]["spec"]["rayClusterSpec"]
    group = ann["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 16) and ann["enableInTreeAutoscaling"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_relative_local_paths_are_resolved(tmp_path):
    run = spec.parse_run(minimal_doc(storage={"uri": "runs"}, data={"logs": "logs/", "evalSet": "s3://b/e.jsonl",
                                                                      "sftSeed": "sft.jsonl"}))
    fixed = spec.with_absolute_paths(run, tmp_path)
    assert fixed.spec.storage.uri == str(tmp_path / "runs")
    assert fixed.spec.data.logs == str(tmp_path / "logs")
    assert fixed.spec.data.eval_set == "s3://b/e.jsonl"
