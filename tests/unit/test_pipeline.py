import json

import pytest

from kubedistill.core import pipeline, registry, spec
from tests.conftest import minimal_doc


def _build(**patch):
    return pipeline.build(spec.parse_run(minimal_doc(**patch)))


def test_minimal_resource_enables_every_stage_in_order():
    stages = _build()
    # every stage but rationalize, which explains human labels only when asked (spec.annotation.mode)
    assert [s.name for s in stages] == [d.name for d in registry.STAGES if d.name != "rationalize"]
    by = {s.name: s for s in stages}
    assert by["teacher-dpo"].depends_on == ("data", "teacher-sft", "reward-model")
    assert by["annotate"].depends_on == ("data", "teacher-dpo")
    assert by["serve"].depends_on == ("student-crsd", "evaluate")
    assert by["student-crsd"].entrypoint == "python -m kubedistill.job kubedistill.stages.student:run_stage"
    assert [s.name for s in stages if s.service] == [s.name for s in stages if s.gated] == ["serve"]
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


def test_the_pruned_teacher_as_annotator_puts_prune_search_before_annotate():
    stages = _build(annotation={"model": "prune-search"})
    order = [s.name for s in stages]
    by = {s.name: s.depends_on for s in stages}
    assert by["annotate"] == ("data", "prune-search") and by["prune-search"] == ("data", "teacher-dpo")
    assert order.index("teacher-dpo") < order.index("prune-search") < order.index("annotate") < order.index("student-crsd")
    # rationalizing with it explains labels for the student only: the teacher cannot wait on its own pruned copy
    g = _graph(annotation={"model": "prune-search", "mode": "both"}, pruning={"enabled": True})
    assert g["teacher-sft"] == ("data", "teacher-dapt") and g["rationalize"] == ("data", "prune-search")
    # a model named to prune needs no teacher
    g = _graph(teacher={"enabled": False}, annotation={"model": "prune-search"},
               pruning={"enabled": True, "model": "s3://m/llama"})
    assert g["prune-search"] == ("data",) and g["annotate"] == ("data", "prune-search") and "teacher-dpo" not in g


def _graph(**patch) -> dict[str, tuple[str, ...]]:
    stages = _build(**{"pruning": {"enabled": False}, "serving": {"enabled": False}, **patch})
    order = [s.name for s in stages]
    assert all(order.index(d) < order.index(s.name) for s in stages for d in s.depends_on), order
    return {s.name: s.depends_on for s in stages}


def test_annotation_modes_decide_which_llm_stages_run_and_who_reads_them():
    byo = {"teacher": {"enabled": False}, "student": {"trainOn": "labels"}}
    g = _graph(annotation={"mode": "label", "model": "s3://m/llm"}, **byo)
    assert "rationalize" not in g and "annotate" in g and g["student-crsd"] == ("data",)  # trainOn labels
    g = _graph(annotation={"mode": "rationalize", "model": "s3://m/llm"}, **byo)
    assert "annotate" not in g and g["rationalize"] == ("data",) and g["student-crsd"] == ("data", "rationalize")
    assert g["evaluate"] == ("data", "student-crsd")  # the baseline reads no reasoning
    g = _graph(annotation={"mode": "both", "model": "s3://m/llm"}, teacher={"enabled": False},
               student={"trainOn": "both"})
    assert g["student-crsd"] == ("data", "annotate", "rationalize")
    assert _graph(annotation={"mode": "rationalize", "model": "s3://m/llm"},
                  teacher={"enabled": False})["student-crsd"] == ("data", "rationalize")  # auto: labels
    # the trained teacher explains the labels after it is trained; another LLM explains them for its SFT
    g = _graph(annotation={"mode": "rationalize"})
    assert g["rationalize"] == ("data", "teacher-dpo") and "rationalize" not in g["teacher-sft"]
    g = _graph(annotation={"mode": "rationalize", "model": "s3://m/llm"})
    assert g["rationalize"] == ("data",) and g["teacher-dapt"] == ("data",)
    for s in ("teacher-sft", "reward-model", "teacher-dpo"):
        assert g[s][-1] == "rationalize", s
    assert list(g).index("rationalize") < list(g).index("teacher-sft")


def test_a_spec_asking_for_annotations_that_no_stage_makes_is_refused():
    with pytest.raises(spec.SpecError, match=r"spec.student.trainOn: annotations needs the annotate stage"):
        spec.parse_run(minimal_doc(annotation={"mode": "rationalize"}, student={"trainOn": "annotations"}))


def test_stage_config_is_json_with_only_its_sections():
    by = {s.name: s for s in _build()}
    cfg = json.loads(by["serve"].config_json)
    assert cfg["run"] == "test-run" and cfg["stage"] == "serve"
    assert set(cfg["spec"]) == {"labels", "serving"}
    assert cfg["inputs"] == ["student-crsd", "evaluate"]
    assert set(json.loads(by["teacher-dapt"].config_json)["spec"]["teacher"]) == {
        "baseModel", "dapt", "resources", "maxFailures", "maxLength", "gradientCheckpointing", "seed"}


def test_config_hash_changes_only_for_stages_that_read_the_change():
    base = {s.name: s.config_hash for s in _build()}
    changed = {s.name: s.config_hash for s in _build(serving={"replicas": {"min": 1, "max": 8}})}
    assert {n for n in base if base[n] != changed[n]} == {"serve"}
    reseeded = {s.name: s.config_hash for s in _build(teacher={"seed": 1})}
    assert {n for n in base if base[n] != reseeded[n]} == {"teacher-dapt", "teacher-sft", "reward-model", "teacher-dpo"}
    # the teacher's answer budget: every stage that generates the teacher's answers, not DAPT (which generates none)
    budget = {s.name: s.config_hash for s in _build(teacher={"maxNewTokens": 256})}
    assert {n for n in base if base[n] != budget[n]} == {"teacher-sft", "reward-model", "teacher-dpo", "prune-search"}
    # the queries held out of SFT for DPO: what SFT trains on, what DPO and the reward model's own answers ask
    held = {s.name: s.config_hash for s in _build(teacher={"preferenceHoldout": 0.2})}
    assert {n for n in base if base[n] != held[n]} == {"teacher-sft", "reward-model", "teacher-dpo"}
    moved = {s.name: s.config_hash for s in _build(storage={"uri": "s3://elsewhere/x"})}
    assert moved == base  # where artifacts live is not what they depend on


def test_a_synthetic_runs_data_carries_the_generators_revision_and_user_logs_do_not():
    from kubedistill.core.registry import SYNTHETIC_REVISION

    by = {s.name: s for s in _build()}
    assert json.loads(by["data"].config_json)["code"] == SYNTHETIC_REVISION  # an older revision's data is rebuilt
    assert all("code" not in json.loads(s.config_json) for n, s in by.items() if n != "data")
    logs = {s.name: s for s in _build(data={"logs": "s3://bucket/logs", "evalSet": "s3://bucket/eval",
                                                   "sftSeed": "s3://bucket/sft"})}
    assert "code" not in json.loads(logs["data"].config_json)  # ingesting user logs is not the generator


def test_a_reward_model_with_grounding_pairs_carries_their_revision_and_others_do_not():
    from kubedistill.core.registry import GROUNDING_REVISION

    dims = {"label": 1.0, "grounding": 1.0}
    by = {s.name: s for s in _build(teacher={"rewardModel": {"dimensions": dims}})}
    assert json.loads(by["reward-model"].config_json)["code"] == GROUNDING_REVISION
    assert "code" not in json.loads(by["teacher-dpo"].config_json)  # it follows through its input's digest
    assert "code" not in json.loads({s.name: s for s in _build()}["reward-model"].config_json)


def test_resources_come_from_the_spec():
    by = {s.name: s for s in _build(teacher={"resources": {"workers": 8, "gpusPerWorker": 1}},
                                    annotation={"replicas": {"min": 1, "max": 16}})}
    assert by["teacher-sft"].resources.workers == 8 and by["teacher-sft"].resources.gpus_per_worker == 1
    assert by["annotate"].resources.workers == 16 and by["annotate"].workers == (1, 16)  # autoscaled
    assert by["teacher-sft"].workers == (8, 8)
    assert by["data"].resources.workers == 1


def test_the_plan_lists_every_stage_with_its_resources():
    stages = _build()
    plan = pipeline.render_plan(spec.parse_run(minimal_doc()), stages)
    assert all(f"{s.name}" in plan for s in stages) and "kubedistill.stages.prune_search:run_stage" in plan


def _read(view, dotted: str):
    """`spec.<dotted>` (camelCase, as a registry entry names it) read through a stage's typed view."""
    obj = view
    for part in dotted.split("."):
        model = obj._model if isinstance(obj, spec.SpecSlice) else type(obj)
        obj = getattr(obj, next(n for n, f in model.model_fields.items() if (f.alias or n) == part))
    return obj


def test_every_registry_entry_names_a_stage_function_and_spec_paths_it_can_read():
    from kubedistill import job

    run = spec.parse_run(minimal_doc(annotation={"mode": "both"}))  # every stage
    for d, s in zip(registry.STAGES, sorted(pipeline.build(run), key=lambda s: registry.STAGES.index(
            next(d for d in registry.STAGES if d.name == s.name))), strict=True):
        assert callable(job.resolve(d.run)), d.name
        view = spec.spec_slice(s.config["spec"], s.name)
        for dotted in d.reads:  # carried, validated again, equal to what the whole spec holds
            assert _read(view, dotted) == _read(run.spec, dotted), (d.name, dotted)


def test_a_stage_reading_a_path_it_did_not_declare_is_told_which_and_where():
    serve = next(s for s in _build() if s.name == "serve")
    view = spec.spec_slice(serve.config["spec"], "serve")
    assert view.serving.max_services == 100
    with pytest.raises(spec.UndeclaredSpecPath, match=r"stage serve does not read spec.student: add it .*registry.py"):
        view.student


def test_a_config_altered_after_validation_fails_on_the_worker_naming_the_field():
    dpo = next(s for s in _build() if s.name == "teacher-dpo")
    section = json.loads(dpo.config_json)["spec"]
    section["teacher"]["resources"]["workers"] = 0
    with pytest.raises(spec.SpecError, match=r"spec.teacher.resources.workers: Input should be greater than"):
        spec.spec_slice(section, "teacher-dpo").teacher.resources


def test_a_registry_mistake_is_named_when_the_graph_is_built(monkeypatch):
    stages = registry.STAGES
    wrong_path = registry.StageDef("toy", "m:f", reads=("teacher.nope",), inputs=lambda s: ("data",))
    monkeypatch.setattr(registry, "STAGES", (*registry.STAGES, wrong_path))
    with pytest.raises(pipeline.RegistryError, match=r"stage toy: reads spec.teacher.nope"):
        _build()
    unknown = registry.StageDef("toy", "m:f", reads=(), inputs=lambda s: ("serve-later",))
    monkeypatch.setattr(registry, "STAGES", (unknown, *stages))
    with pytest.raises(pipeline.RegistryError, match=r"stage toy: input\(s\) \['serve-later'\] are not enabled"):
        _build()
    a, b = (registry.StageDef(n, "m:f", reads=(), inputs=lambda s, o=o: ("data", o)) for n, o in (("a", "b"), ("b", "a")))
    monkeypatch.setattr(registry, "STAGES", (*stages, a, b))
    with pytest.raises(pipeline.RegistryError, match=r"stages \['a', 'b'\] wait on each other \(a cycle\)"):
        _build()


@pytest.mark.parametrize(("target", "says"), [
    ("kubedistill.stages.student", "expected <module>:<function>"),
    ("kubedistill.stages.nope:run_stage", "cannot load stage function"),
    ("kubedistill.stages.student:nope", "cannot load stage function"),
    ("kubedistill.stages.student:ARTIFACT_VERSION", "is not a function"),
])
def test_a_job_whose_stage_function_cannot_be_loaded_says_which(target, says):
    from kubedistill import job

    with pytest.raises(SystemExit, match=says):
        job.resolve(target)
    with pytest.raises(SystemExit, match="usage: python -m kubedistill.job"):
        job.main([])


def test_the_served_model_is_the_one_evaluate_scored_else_the_students_and_none_before_either():
    student = {"outputs": {"model": "s3://b/r/student-crsd/v-2/model"}}
    evaluated = {"outputs": {"metrics": "m.json", "model": "s3://b/r/student-crsd/v-1/model"}}
    assert pipeline.promoted_model({"student-crsd": student, "evaluate": evaluated}.get) == "s3://b/r/student-crsd/v-1/model"
    assert pipeline.promoted_model({"student-crsd": student, "evaluate": {"outputs": {}}}.get) == \
        "s3://b/r/student-crsd/v-2/model"  # an evaluate manifest from before it named the model
    assert pipeline.promoted_model({}.get) is None
    assert pipeline.promoted_model({"student-crsd": {"outputs": {}}}.get) is None


def test_the_served_runtime_is_the_specs_when_its_check_passed_else_evaluates_pick():
    student = {"outputs": {"model": "s3://b/r/student-crsd/v-1/model"}}
    checks = {"torch": {"passed": True, "reason": "the reference"},
              "onnx": {"passed": True, "reason": "largest probability difference to torch 1.0e-07 (<= 1e-04)"},
              "onnx-int8": {"passed": False, "reason": "+0.80 points lost (> 0.5)"}}
    evaluated = {"metrics": {"runtimes": checks}, "outputs": {"model": "s3://b/r/student-crsd/v-1/model",
                                                              "runtime": "onnx"}}
    manifests = {"student-crsd": student, "evaluate": evaluated}.get
    assert pipeline.promoted(manifests, None) == pipeline.Served("s3://b/r/student-crsd/v-1/model", "onnx")
    assert pipeline.promoted(manifests, "torch").runtime == "torch"
    with pytest.raises(ValueError, match=r"spec.serving.runtime: onnx-int8 failed its check .*\+0.80 points lost"):
        pipeline.promoted(manifests, "onnx-int8")
    # no evaluation of the exports: the native model, and nothing unchecked
    unchecked = {"student-crsd": student}.get
    assert pipeline.promoted(unchecked, None) == pipeline.Served("s3://b/r/student-crsd/v-1/model", "torch")
    with pytest.raises(ValueError, match="spec.serving.runtime: onnx was never checked on the eval set"):
        pipeline.promoted(unchecked, "onnx")
    assert pipeline.promoted({}.get, None) is None
    # GPU replicas: torch unless the spec says otherwise (ONNX Runtime scores on CPUs here)
    assert pipeline.promoted(manifests, None, gpu=True).runtime == "torch"
