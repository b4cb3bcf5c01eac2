"""The step policy both executors follow (`kubedistill.core.policy`), on manifests built by hand."""

import hashlib
import json

import pytest

from kubedistill.core import pipeline, policy, spec
from tests.conftest import minimal_doc

OFF = {"teacher": {"enabled": False}, "annotation": {"enabled": False}, "pruning": {"enabled": False}}


def _stages(**spec_fields):
    return pipeline.build(spec.parse_run(minimal_doc(**{**OFF, **spec_fields})))


def _finish(manifests: dict, stage, gate_passed=True):
    """The manifest `stage` writes: its config hash, its inputs' current digests, then its own digest."""
    m = {"configHash": stage.config_hash, "inputs": {d: manifests[d]["digest"] for d in stage.depends_on},
         "artifact": f"/tmp/kd/test-run/{stage.name}", "metrics": {}}
    if stage.name == "evaluate":
        m["metrics"] = {"gate": {"candidate": "student", "passed": gate_passed, "reason": "macro-F1 0.5 < 0.7"}}
    m["digest"] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]
    manifests[stage.name] = m


def _all_done(stages, gate_passed=True):
    manifests: dict = {}
    for s in stages:
        if not s.service:
            _finish(manifests, s, gate_passed)
    return manifests


def _states(stages, manifests):
    return {n: (s.state, s.ready, s.reason) for n, s in policy.steps(stages, manifests.get).items()}


def test_a_fresh_run_can_start_only_its_first_stage():
    stages = _stages()
    assert _states(stages, {}) == {
        "data": ("runnable", True, None),
        "student-crsd": ("blocked", False, "waiting for data"),
        "evaluate": ("blocked", False, "waiting for data, student-crsd"),
        "serve": ("runnable", False, "waiting for student-crsd, evaluate"),
    }


def test_a_finished_run_is_done_and_its_service_acts_again():
    stages = _stages()
    steps = policy.steps(stages, _all_done(stages).get)
    assert [(n, s.state) for n, s in steps.items()] == [
        ("data", "done"), ("student-crsd", "done"), ("evaluate", "done"), ("serve", "runnable")]
    assert [n for n, s in steps.items() if s.should_run] == ["serve"]


def test_a_failed_gate_skips_the_gated_stage_with_the_gates_reason():
    stages = _stages()
    serve = policy.steps(stages, _all_done(stages, gate_passed=False).get)["serve"]
    assert (serve.state, serve.reason, serve.should_run) == ("skipped", "not promoted: macro-F1 0.5 < 0.7", False)


def test_an_upstream_edit_makes_every_downstream_stage_stale_at_once():
    stages = _stages()
    manifests = _all_done(stages)
    edited = _stages(data={"synthetic": {"seed": 5}})
    assert _states(edited, manifests) == {
        "data": ("stale", True, "its config changed"),
        "student-crsd": ("stale", False, "input data is being rebuilt (its config changed)"),
        "evaluate": ("stale", False, "input data is being rebuilt (its config changed)"),
        "serve": ("runnable", False, "waiting for student-crsd, evaluate"),
    }
    # data reruns: its new manifest makes the next stage runnable, and what depends on it still stale
    _finish(manifests, edited[0])
    assert _states(edited, manifests)["student-crsd"] == ("stale", True, "input data changed")
    assert _states(edited, manifests)["evaluate"][:2] == ("stale", False)
    for s in edited[1:3]:
        _finish(manifests, s)
    assert all(st.state == "done" for n, st in policy.steps(edited, manifests.get).items() if n != "serve")


def test_a_middle_edit_leaves_upstream_done_and_a_leaf_edit_only_the_leaf():
    stages = _stages()
    manifests = _all_done(stages)
    middle = _states(_stages(student={"maxLength": 96}), manifests)  # a key evaluate does not read
    assert middle["data"][0] == "done" and middle["student-crsd"] == ("stale", True, "its config changed")
    assert middle["evaluate"] == ("stale", False, "input student-crsd is being rebuilt (its config changed)")
    leaf = _states(_stages(evaluation={"minMacroF1": 0.9}), manifests)
    assert [n for n, s in leaf.items() if s[0] != "done"] == ["evaluate", "serve"]
    assert leaf["evaluate"] == ("stale", True, "its config changed")


def test_an_input_rebuilt_behind_the_stages_back_is_seen_by_digest():
    """Same config everywhere, but data's manifest was rewritten (a rerun elsewhere, or by hand)."""
    stages = _stages()
    manifests = _all_done(stages)
    manifests["data"] = {**manifests["data"], "digest": "rewritten"}
    states = _states(stages, manifests)
    assert states["data"][0] == "done" and states["student-crsd"] == ("stale", True, "input data changed")
    assert states["evaluate"][0] == "stale"


def test_a_stage_whose_manifest_is_gone_runs_again_and_blocks_what_follows():
    stages = _stages()
    manifests = _all_done(stages)
    del manifests["student-crsd"]
    states = _states(stages, manifests)
    assert states["student-crsd"] == ("runnable", True, None)
    assert states["evaluate"] == ("stale", False, "input student-crsd is being rebuilt")


@pytest.mark.parametrize("patch", [{"data": {"synthetic": {"seed": 9}}}, {"student": {"seed": 4}}, {}])
def test_inputs_key_changes_exactly_when_an_input_manifest_does(patch):
    stages = _stages()
    manifests = _all_done(stages)
    student = stages[1]
    key = policy.inputs_key(student, manifests.get)
    assert key == policy.inputs_key(_stages(**patch)[1], manifests.get)  # config does not enter it
    manifests["data"] = {**manifests["data"], "digest": "other"}
    assert policy.inputs_key(student, manifests.get) != key
    assert policy.inputs_key(student, {}.get) is None
