import json

from kubedistill.core import pipeline, spec
from tests.conftest import minimal_doc


def _build(**patch):
    return pipeline.build(spec.parse_run(minimal_doc(**patch)))


def test_minimal_resource_enables_every_stage_in_order():
    stages = _build()
    assert [s.name for s in stages] == list(pipeline.STAGE_ORDER)
    by = {s.name: s for s in stages}
    assert by["teacher-dpo"].depends_on == ("data", "teacher-sft", "reward-model")
    assert by["annotate"].depends_on == ("data", "teacher-dpo")
    assert by["serve"].depends_on == ("student-crsd", "evaluate")
    assert by["student-crsd"].entrypoint == "python jobs/student_crsd.py"
    for s in stages:  # dependencies always come earlier
        order = [x.name for x in stages]
        assert all(order.index(d) < order.index(s.name) for d in s.depends_on)


def test_disabled_stages_are_left_out_and_dependencies_rewired():
    stages = _build(teacher={"enabled": False}, annotation={"model": "s3://models/teacher/"},
                    pruning={"enabled": False}, serving={"enabled": False})
    assert [s.name for s in stages] == ["data", "annotate", "student-crsd", "evaluate"]
    assert stages[1].depends_on == ("data",)
    # the baseline learns from what the student learns from: the annotations
    assert stages[3].depends_on == ("data", "annotate", "student-crsd")
    only = _build(teacher={"enabled": False}, annotation={"enabled": False}, student={"enabled": False},
                  pruning={"enabled": False}, serving={"enabled": False})
    assert [(s.name, s.depends_on) for s in only] == [("data", ()), ("evaluate", ("data",))]


def test_stage_config_is_json_with_only_its_sections():
    by = {s.name: s for s in _build()}
    cfg = json.loads(by["serve"].config_json)
    assert cfg["run"] == "test-run" and cfg["stage"] == "serve"
    assert set(cfg["spec"]) == {"labels", "serving"}
    assert cfg["inputs"] == ["student-crsd", "evaluate"]
    assert set(json.loads(by["teacher-dapt"].config_json)["spec"]["teacher"]) == {"baseModel", "dapt", "resources", "maxFailures"}


def test_config_hash_changes_only_for_stages_that_read_the_change():
    base = {s.name: s.config_hash for s in _build()}
    changed = {s.name: s.config_hash for s in _build(serving={"replicas": {"min": 1, "max": 8}})}
    assert {n for n in base if base[n] != changed[n]} == {"serve"}
    moved = {s.name: s.config_hash for s in _build(storage={"uri": "s3://elsewhere/x"})}
    assert moved == base  # where artifacts live is not what they depend on


def test_resources_come_from_the_spec():
    by = {s.name: s for s in _build(teacher={"resources": {"workers": 8, "gpusPerWorker": 1}},
                                    annotation={"replicas": {"min": 1, "max": 16}})}
    assert by["teacher-sft"].resources.workers == 8 and by["teacher-sft"].resources.gpus_per_worker == 1
    assert by["annotate"].resources.workers == 16
    assert by["data"].resources.workers == 1


def test_the_plan_lists_every_stage_with_its_resources():
    stages = _build()
    plan = pipeline.render_plan(spec.parse_run(minimal_doc()), stages)
    assert all(f"{s.name}" in plan for s in stages) and "python jobs/prune_search.py" in plan
