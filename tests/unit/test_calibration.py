"""Class weights, temperature scaling, decision offsets and ECE on hand-computed cases; where the student and
the baseline fit them (validation only), and that /score and evaluate apply what was stored."""

import math

import numpy as np
import pytest
import torch

from kubedistill.core import spec
from kubedistill.core.spec import StudentSpec
from kubedistill.ml import calibration
from kubedistill.ml.metrics import classification_metrics
from kubedistill.stages import data, evaluate
from kubedistill.stages.data import split_by_query
from kubedistill.stages.serving import score_results
from kubedistill.stages.student import (
    Encoded,
    StudentConfig,
    build_model,
    calibrate,
    epoch_order,
    export,
    load_student,
    loss_terms,
    rows_digest,
)
from kubedistill.core.storage import Storage
from tests.conftest import minimal_doc

LABELS = ["irrelevant", "partial", "relevant"]


def test_balanced_and_custom_class_weights_by_hand():
    w = calibration.class_weights("balanced", LABELS, ["irrelevant"] * 3 + ["partial"])
    # n=4, 2 grades present: 4 / (2*3), 4 / (2*1); the absent grade weighs 1 (it is never a target)
    assert w.tolist() == pytest.approx([2 / 3, 2.0, 1.0])
    assert calibration.class_weights("none", LABELS, ["partial"]) is None
    assert calibration.class_weights("custom", LABELS, [], {"relevant": 4.0}).tolist() == [1.0, 1.0, 4.0]
    with pytest.raises(ValueError, match=r"customClassWeights: labels \['other'\] are not in"):
        calibration.class_weights("custom", LABELS, [], {"other": 2.0})
    with pytest.raises(ValueError, match="classWeights: expected none, balanced or custom"):
        calibration.class_weights("inverse", LABELS, ["partial"])


def test_ece_and_reliability_by_hand():
    proba = np.array([[0.95, 0.05], [0.91, 0.09], [0.3, 0.7]])
    y = np.array([0, 1, 1])
    bins = calibration.reliability(proba, y)
    # bin (0.9, 1.0]: confidences 0.95 and 0.91 (mean 0.93), one right; bin (0.6, 0.7]: 0.7, right
    assert [(b["count"], b["confidence"], b["accuracy"]) for b in bins] == [
        (1, pytest.approx(0.7), 1.0), (2, pytest.approx(0.93), 0.5)]
    assert calibration.expected_calibration_error(proba, y) == pytest.approx((2 * 0.43 + 0.3) / 3)
    assert classification_metrics(["a", "b", "b"], proba, ["a", "b"])["ece"] == pytest.approx((2 * 0.43 + 0.3) / 3)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_temperature_recovers_a_known_temperature_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20_000, 3))
    true_t = 2.0
    p_true = np.exp(logits / true_t) / np.exp(logits / true_t).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in p_true])
    overconfident = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # the model's T=1 probabilities
    t = calibration.fit_temperature(overconfident, y)
    assert t == pytest.approx(true_t, rel=0.05)
    scaled = calibration.apply_temperature(overconfident, t)
    assert (scaled.argmax(1) == overconfident.argmax(1)).all()
    assert calibration.nll(scaled, y) < calibration.nll(overconfident, y)
    assert calibration.expected_calibration_error(scaled, y) < calibration.expected_calibration_error(overconfident, y)
    assert calibration.apply_temperature(overconfident, 1.0) == pytest.approx(overconfident)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        calibration.apply_temperature(overconfident, 0.0)


def test_offsets_find_a_grade_the_argmax_never_predicts_and_leave_a_good_argmax_alone():
    # class 2 is never the argmax, but its probability is higher on its own examples
    proba = np.array([[0.7, 0.25, 0.05]] * 6 + [[0.2, 0.7, 0.1]] * 6 + [[0.5, 0.2, 0.3]] * 3)
    y = np.array([0] * 6 + [1] * 6 + [2] * 3)
    assert calibration.decide(proba).tolist().count(2) == 0
    b = calibration.fit_offsets(proba, y)
    assert b[0] == 0.0 and b[2] > 0
    pred = calibration.decide(proba, b)
    assert (pred == y).all()
    # by hand: log 0.3 + b2 > log 0.5 needs b2 > log(5/3) = 0.51, and log 0.05 + b2 < log 0.7 needs b2 < 2.64
    assert math.log(5 / 3) < b[2] < math.log(0.7 / 0.05)
    good = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    assert calibration.fit_offsets(good, np.array([0, 1, 2])).tolist() == [0.0, 0.0, 0.0]
    m = classification_metrics(["irrelevant"] * 6 + ["partial"] * 6 + ["relevant"] * 3, proba, LABELS, b.tolist())
    assert m["macro_f1"] == 1.0 and m["per_class"]["relevant"]["recall"] == 1.0


def test_score_applies_the_stored_offsets():
    probs = np.array([[0.5, 0.2, 0.3]])
    plain = score_results(probs, LABELS, ["s1"])
    shifted = score_results(probs, LABELS, ["s1"], [0.0, 0.0, 1.0])
    assert plain[0]["label"] == "irrelevant" and shifted[0]["label"] == "relevant"
    assert plain[0]["probabilities"] == shifted[0]["probabilities"] and plain[0]["score"] == shifted[0]["score"]


@pytest.fixture(scope="module")
def rows():
    return data.generate(LABELS, 60, 40, 4, 1, 40, seed=0).labeled


def _cfg(tiny_encoder, train=None, **kw):
    return StudentConfig(StudentSpec.model_validate({
        "base_model": tiny_encoder, "max_length": 48, "objective": "ce",
        "train": {"batch_size": 8, "epochs": 1, "learning_rate": 1e-3, **(train or {})}, **kw}), LABELS)


def test_class_weights_reach_every_objective(tiny_encoder, rows):
    few = rows[:12]
    for objective in ("ce", "crsd", "kd"):
        extra = {"objective": objective}
        batch = [{**r, "label_probs": [0.2, 0.3, 0.5]} for r in few] if objective == "kd" else few
        plain_cfg = _cfg(tiny_encoder, **extra)
        weighted_cfg = _cfg(tiny_encoder, train={"class_weights": "custom",
                                                 "custom_class_weights": {"relevant": 5.0}}, **extra)
        model, tok = build_model(plain_cfg)
        model.eval()  # no dropout: the same forward twice
        idx = torch.arange(len(batch))
        enc_w = Encoded(tok, batch, weighted_cfg, with_reasoning=objective == "crsd")
        assert enc_w.class_weight.tolist() == [1.0, 1.0, 5.0]
        plain = loss_terms(model, Encoded(tok, batch, plain_cfg, objective == "crsd"), idx, plain_cfg)
        weighted = loss_terms(model, enc_w, idx, weighted_cfg)
        assert Encoded(tok, batch, plain_cfg, objective == "crsd").class_weight is None
        assert weighted["sce"].item() != pytest.approx(plain["sce"].item())
        if objective == "crsd":
            assert weighted["tce"].item() != pytest.approx(plain["tce"].item())
            assert weighted["align"].item() == pytest.approx(plain["align"].item())
        if objective == "kd":
            assert weighted["kd"].item() != pytest.approx(plain["kd"].item())


def test_balanced_sampling_draws_every_grade_about_equally_and_is_a_function_of_the_epoch(tiny_encoder, rows):
    cfg = _cfg(tiny_encoder, train={"sampling": "balanced"})
    _, tok = build_model(cfg)
    skewed = [r for r in rows if r["label"] == "irrelevant"] + [r for r in rows if r["label"] == "relevant"][:5]
    enc = Encoded(tok, skewed, cfg, with_reasoning=False)
    draws = torch.cat([enc.labels[epoch_order(enc, cfg, e)] for e in range(40)])
    share = torch.bincount(draws, minlength=3).float() / len(draws)
    assert share[0] == pytest.approx(0.5, abs=0.05) and share[2] == pytest.approx(0.5, abs=0.05)
    assert torch.equal(epoch_order(enc, cfg, 3), epoch_order(enc, cfg, 3))  # resume draws the same batches
    shuffle = _cfg(tiny_encoder, train={"sampling": "shuffle"})
    assert sorted(epoch_order(enc, shuffle, 0).tolist()) == list(range(len(skewed)))


def test_the_student_calibrates_on_validation_rows_only_and_load_applies_it(tiny_encoder, rows, tmp_path, monkeypatch):
    gen = data.generate(LABELS, 60, 40, 4, 1, 40, seed=0)
    train, val = split_by_query(gen.labeled, 0.25, seed=0)
    cfg = _cfg(tiny_encoder, calibration={"temperature": True, "offsets": True})
    model, tok = build_model(cfg)
    seen = []
    real_t, real_b = calibration.fit_temperature, calibration.fit_offsets
    monkeypatch.setattr(calibration, "fit_temperature", lambda p, y, *a: seen.append(("t", len(y))) or real_t(p, y))
    monkeypatch.setattr(calibration, "fit_offsets", lambda p, y, *a: seen.append(("b", len(y))) or real_b(p, y))
    cal = calibrate(cfg, model, tok, val)
    assert seen == [("t", len(val)), ("b", len(val))]
    assert cal["fittedOn"] == "validation" and cal["rows"] == len(val) and cal["pairsDigest"] == rows_digest(val)
    assert rows_digest(val) != rows_digest(gen.eval)
    assert {r["query"] for r in val}.isdisjoint({r["query"] for r in gen.eval})
    export(model, tok, cfg, Storage(str(tmp_path)), {"calibration": {**cal, "offsets": {"relevant": 2.0}}})
    loaded = load_student(str(tmp_path))
    raw = loaded.predict_proba(gen.eval, calibrated=False)
    assert loaded.predict_proba(gen.eval) == pytest.approx(calibration.apply_temperature(raw, cal["temperature"]),
                                                           abs=1e-5)
    assert loaded.offsets == [0.0, 0.0, 2.0]
    assert (loaded.decide(raw) == calibration.decide(raw, [0.0, 0.0, 2.0])).all()
    # off: temperature 1 and no offsets
    none = calibrate(_cfg(tiny_encoder, calibration={"temperature": False, "offsets": False}), model, tok, val)
    assert none["temperature"] == 1.0 and set(none["offsets"].values()) == {0.0}


def test_the_baseline_is_weighted_like_the_student_and_fits_offsets_on_its_held_out_queries(monkeypatch):
    gen = data.generate(LABELS, 200, 200, 6, 1, 200, seed=3)
    student = StudentSpec.model_validate({"train": {"class_weights": "balanced"}, "calibration": {"offsets": True},
                                          "validation_fraction": 0.2, "seed": 4})
    seen = []
    real = evaluate.LexicalBaseline.fit_offsets
    monkeypatch.setattr(evaluate.LexicalBaseline, "fit_offsets", lambda self, rows: seen.append(rows) or real(self, rows))
    base = evaluate.baseline_for(student, LABELS, gen.labeled)
    _, held_out = split_by_query(gen.labeled, 0.2, 4)  # the student's own validation split
    assert [r["pair_id"] for r in seen[0]] == [r["pair_id"] for r in held_out]
    assert {r["pair_id"] for r in seen[0]}.isdisjoint({r["pair_id"] for r in gen.eval})
    assert base.offsets is not None and base.offsets[0] == 0.0
    assert base.model[-1].class_weight is not None and len(set(base.model[-1].class_weight.values())) == 3
    plain = evaluate.baseline_for(StudentSpec.model_validate({"train": {"sampling": "shuffle"}}), LABELS, gen.labeled)
    assert plain.offsets is None and plain.model[-1].class_weight is None and not plain.weighted and base.weighted
    sampled = evaluate.baseline_for(StudentSpec.model_validate({"train": {"sampling": "balanced"}}), LABELS, gen.labeled)
    assert sampled.model[-1].class_weight is not None  # balanced sampling: balanced weights for the baseline


def test_with_validate_on_sft_seed_the_baseline_fits_offsets_on_the_students_sft_validation_split(monkeypatch):
    gen = data.generate(LABELS, 200, 200, 6, 300, 200, seed=3)
    student = StudentSpec.model_validate({"calibration": {"offsets": True}, "validation_fraction": 0.2, "seed": 4,
                                          "validate_on": "sftSeed"})
    seen = []
    real = evaluate.LexicalBaseline.fit_offsets
    monkeypatch.setattr(evaluate.LexicalBaseline, "fit_offsets", lambda self, rows: seen.append(rows) or real(self, rows))
    base = evaluate.baseline_for(student, LABELS, gen.labeled, gen.sft)
    _, held_out = split_by_query(gen.sft, 0.2, 4)  # the student's validation split: SFT queries, true labels
    assert [r["pair_id"] for r in seen[0]] == [r["pair_id"] for r in held_out] and base.offsets is not None
    with pytest.raises(ValueError, match="spec.student.validateOn: sftSeed needs the data stage's SFT set"):
        evaluate.baseline_for(student, LABELS, gen.labeled, [])


def test_spec_errors_name_the_class_weight_fields():
    def problems(train):
        with pytest.raises(spec.SpecError) as e:
            spec.parse_run(minimal_doc(student={"train": train}))
        return str(e.value)

    assert "spec.student.train.customClassWeights: required" in problems({"classWeights": "custom"})
    assert "labels ['bogus'] are not in spec.labels" in problems(
        {"classWeights": "custom", "customClassWeights": {"bogus": 2.0}})
    assert "only with classWeights custom" in problems({"customClassWeights": {"partial": 2.0}})
    assert "spec.student.train.classWeights" in problems({"classWeights": "inverse"})
    assert "spec.student.train.customClassWeights.partial" in problems(
        {"classWeights": "custom", "customClassWeights": {"partial": 0}})
    ok = spec.parse_run(minimal_doc(student={"train": {"classWeights": "custom",
                                                       "customClassWeights": {"partial": 2}}}))
    assert ok.spec.student.train.custom_class_weights == {"partial": 2.0}


def test_the_evaluate_stage_config_carries_what_the_baseline_reads():
    from kubedistill.core import pipeline

    run = spec.parse_run(minimal_doc(student={"train": {"classWeights": "custom",
                                                        "customClassWeights": {"relevant": 3.0}},
                                              "calibration": {"offsets": True}}))
    stage = next(s for s in pipeline.build(run) if s.name == "evaluate")
    sliced = spec.spec_slice(stage.config["spec"], "evaluate")  # what the stage job reads: nothing else
    gen = data.generate(LABELS, 100, 100, 6, 1, 50, seed=0)
    base = evaluate.baseline_for(sliced.student, sliced.labels, gen.labeled)
    assert base.offsets is not None and base.model[-1].class_weight == {0: 1.0, 1: 1.0, 2: 3.0}
    sft = spec.parse_run(minimal_doc(student={"validateOn": "sftSeed"}))
    stage = next(s for s in pipeline.build(sft) if s.name == "evaluate")
    assert spec.spec_slice(stage.config["spec"], "evaluate").student.validate_on == "sftSeed"


def test_fits_without_held_out_examples_are_refused_by_name():
    empty = np.zeros((0, 3))
    with pytest.raises(ValueError, match="temperature scaling needs held-out examples"):
        calibration.fit_temperature(empty, np.array([], dtype=int))
    with pytest.raises(ValueError, match="decision offsets need held-out examples"):
        calibration.fit_offsets(empty, np.array([], dtype=int))
    with pytest.raises(ValueError, match="no training labels to count"):
        calibration.class_weights("balanced", LABELS, [])
