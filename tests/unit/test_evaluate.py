import math

import numpy as np
import pytest

from kubedistill.core import pipeline
from kubedistill.ml import metrics
from kubedistill.stages import data, evaluate


def test_metrics_on_a_hand_computed_case():
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = metrics.classification_metrics(["a", "a", "b", "b"], proba, ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["auc_ovr"] == 1.0
    assert m["confusion"]["matrix"] == [[1, 1], [0, 2]]


def test_metrics_edge_cases():
    one_class = metrics.classification_metrics(["a", "a"], np.array([[0.6, 0.4], [0.3, 0.7]]), ["a", "b"])
    assert one_class["auc_ovr"] is None and one_class["accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"labels \['zzz'\] are not in spec.labels"):
        metrics.classification_metrics(["zzz"], np.array([[1.0, 0.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="no examples"):
        metrics.classification_metrics([], np.zeros((0, 2)), ["a", "b"])


def test_bm25_on_a_hand_computed_case():
    bm = evaluate.Bm25().fit([["a", "b"], ["a"]])
    assert bm.idf["a"] == pytest.approx(math.log(1.2)) and bm.idf["b"] == pytest.approx(math.log(2))
    # tf=1, |d|=2, avgdl=1.5: norm = 1.2 * (0.25 + 0.75 * 2 / 1.5) = 1.5
    assert bm.score(["b"], ["a", "b"]) == pytest.approx(math.log(2) * 2.2 / 2.5)
    assert bm.score(["c"], ["a", "b"]) == 0.0


def test_baseline_beats_chance_and_handles_unseen_classes():
    labels = ["irrelevant", "partial", "relevant"]
    gen = data.generate(labels, 200, 300, 6, 10, 300, seed=2)
    base = evaluate.LexicalBaseline(labels).fit(gen.labeled)
    m = metrics.classification_metrics([r["label"] for r in gen.eval], base.predict_proba(gen.eval), labels)
    assert m["macro_f1"] > 0.45 and m["auc_ovr"] > 0.7  # chance: 0.33 / 0.5
    two = [r for r in gen.labeled if r["label"] != "partial"]
    proba = evaluate.LexicalBaseline(labels).fit(two).predict_proba(gen.eval[:5])
    assert proba.shape == (5, 3) and np.all(proba[:, 1] == 0)
    with pytest.raises(ValueError, match="two distinct labels"):
        evaluate.LexicalBaseline(labels).fit([r for r in gen.labeled if r["label"] == "partial"])


def test_gate():
    assert evaluate.gate("student", {"macro_f1": 0.71}, 0.7)["passed"] is True
    g = evaluate.gate("baseline", {"macro_f1": 0.5}, 0.7)
    assert g["passed"] is False and "0.5000 < minMacroF1 0.7" in g["reason"]


def test_the_gate_compares_the_student_with_the_baseline_as_well():
    base = {"name": "baseline_unweighted", "macro_f1": 0.70, "interval": (-0.01, 0.03)}
    # above the floor, level with the lexical baseline: the absolute gate alone would serve it
    g = evaluate.gate("student", {"macro_f1": 0.71}, 0.6, 0.02, base)
    assert g["passed"] is False
    floor, compare = g["checks"]
    assert floor["passed"] is True and compare["passed"] is False and compare["value"] == 0.01
    assert compare["baseline"] == "baseline_unweighted" and compare["interval"] == [-0.01, 0.03]
    assert ("gain over the lexical baseline_unweighted (0.7000) +0.0100, 90% paired-bootstrap interval "
            "[-0.0100, +0.0300], < minGainOverBaseline 0.02 (failed)") in g["reason"]
    assert evaluate.gate("student", {"macro_f1": 0.73}, 0.6, 0.02, base)["passed"] is True
    # both must pass: a gain over a weak baseline does not lift a student under the floor
    g = evaluate.gate("student", {"macro_f1": 0.55}, 0.6, -1.0, {**base, "macro_f1": 0.30})
    assert g["passed"] is False and [c["passed"] for c in g["checks"]] == [False, True]
    # what the interval resampled is kept and said
    g = evaluate.gate("student", {"macro_f1": 0.73}, 0.6, 0.02, {**base, "resampled": "65 queries"})
    assert g["checks"][1]["resampled"] == "65 queries"
    assert "90% paired-bootstrap interval over 65 queries [-0.0100, +0.0300], >= minGainOverBaseline" in g["reason"]
    # no student: nothing to compare
    assert [c["rule"] for c in evaluate.gate("baseline", {"macro_f1": 0.8}, 0.6, 0.0, None)["checks"]] == ["minMacroF1"]


def test_the_gain_is_measured_against_the_stronger_baseline():
    assert evaluate.stronger_baseline({"baseline": {"macro_f1": 0.58}, "baseline_unweighted": {"macro_f1": 0.62}}) == "baseline_unweighted"
    assert evaluate.stronger_baseline({"baseline": {"macro_f1": 0.64}, "baseline_unweighted": {"macro_f1": 0.62}}) == "baseline"
    assert evaluate.stronger_baseline({"baseline": {"macro_f1": 0.5}}) == "baseline"


def test_macro_f1_from_confusion_matches_sklearn_and_a_hand_count():
    from sklearn.metrics import f1_score

    cm = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])  # third label never true, never predicted
    # F1 = 2TP / (predicted + true): 6/(3+4) , 4/(3+4), 0 (no support: 0)
    assert metrics.macro_f1_from_confusion(cm) == pytest.approx((6 / 7 + 4 / 7 + 0) / 3)
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    pred = [0, 0, 0, 1, 1, 1, 2, 2]
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (y, pred), 1)
    assert metrics.macro_f1_from_confusion(cm) == pytest.approx(f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0))


def test_paired_bootstrap_interval_of_a_gain():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    same = y.copy()
    same[:200] = (y[:200] + 1) % 3  # wrong on a third of the rows
    assert metrics.paired_gain_interval(y, same, same, 3) == (0.0, 0.0)  # identical models: no gain, no spread
    better = y.copy()
    better[:60] = (y[:60] + 1) % 3  # wrong on a tenth
    lo, hi = metrics.paired_gain_interval(y, better, same, 3)
    point = metrics.macro_f1_from_confusion(np.histogram2d(y, better, bins=3)[0]) - metrics.macro_f1_from_confusion(np.histogram2d(y, same, bins=3)[0])
    assert 0 < lo < point < hi  # the interval holds the gain and excludes zero
    assert metrics.paired_gain_interval(y, same, better, 3) == pytest.approx((-hi, -lo))
    assert metrics.paired_gain_interval(y, better, same, 3, seed=1) != (lo, hi)  # a seeded resample, not a formula
    with pytest.raises(ValueError, match="equal, non-empty"):
        metrics.paired_gain_interval(y, better[:5], same, 3)


def test_the_paired_bootstrap_resamples_whole_queries():
    rng = np.random.default_rng(0)
    queries = np.repeat(np.arange(60), 6)  # 60 queries of 6 pairs, as the eval set holds them
    y = rng.integers(0, 3, len(queries))
    a, b = y.copy(), y.copy()
    # a model that misreads a query misreads all its pairs: a is wrong on 6 queries, b on 12 others
    for q in range(6):
        a[queries == q] = (y[queries == q] + 1) % 3
    for q in range(6, 18):
        b[queries == q] = (y[queries == q] + 1) % 3
    rows = metrics.paired_gain_interval(y, a, b, 3)
    by_query = metrics.paired_gain_interval(y, a, b, 3, groups=queries.tolist())
    assert by_query[0] < rows[0] and by_query[1] > rows[1]  # correlated pairs: resampling rows claims too much
    point = metrics.macro_f1_from_confusion(np.histogram2d(y, a, bins=3)[0]) - metrics.macro_f1_from_confusion(np.histogram2d(y, b, bins=3)[0])
    assert by_query[0] < point < by_query[1]
    # one group: every resample is the whole set, so the interval is the point gain (hand-checkable)
    one = metrics.paired_gain_interval(y, a, b, 3, groups=["q"] * len(y))
    assert one == pytest.approx((point, point))
    # a group per row is the row bootstrap, draw for draw
    assert metrics.paired_gain_interval(y, a, b, 3, groups=[f"r{i}" for i in range(len(y))]) == rows
    with pytest.raises(ValueError, match="one group per row"):
        metrics.paired_gain_interval(y, a, b, 3, groups=["q"] * 5)


def test_plot_is_a_png():
    m = metrics.classification_metrics(["a", "b"], np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    png = evaluate.plot({"baseline": m, "student": m})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_promotion_is_blocked_by_a_failed_gate(tmp_path):
    from kubedistill.core.stage import read_manifest
    from kubedistill.core.storage import Storage

    st = Storage(str(tmp_path))
    assert pipeline.gate_blocks(read_manifest(st, "evaluate")) == "the evaluate stage has not succeeded"
    for candidate, value, want in (("baseline", 0.9, "no student was evaluated"),
                                   ("student", 0.5, "student macro-F1 0.5000 < minMacroF1 0.7 (failed)"),
                                   ("student", 0.8, None)):
        gate = evaluate.gate(candidate, {"macro_f1": value}, 0.7)
        st.write_json("evaluate/_SUCCESS.json", {"digest": "d", "metrics": {"gate": gate}})
        assert pipeline.gate_blocks(read_manifest(st, "evaluate")) == want
