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
