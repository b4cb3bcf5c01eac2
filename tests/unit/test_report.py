"""The run report: built only from what stages wrote to storage."""

from __future__ import annotations

import html
import re

from kubedistill import report
from kubedistill.core.stage import FAILURE, MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages import evaluate


def _manifest(stage: str, inputs: dict[str, str], digest: str, metrics: dict, outputs: dict | None = None) -> dict:
    return {"stage": stage, "run": "r", "configHash": f"hash-{stage}", "inputs": inputs, "startedAt": "t0",
            "finishedAt": "t1", "seconds": 12.5, "artifact": f"/store/r/{stage}", "metrics": metrics,
            "outputs": outputs or {}, "digest": digest}


def _models() -> dict:
    def m(objective: str | None, f1: float) -> dict:
        out = {"accuracy": f1 + 0.01, "macro_f1": f1, "auc_ovr": 0.9, "n": 400}
        return {**out, "objective": objective} if objective else out

    return {"baseline": m(None, 0.6858), "student": m("crsd", 0.7306), "student_ce": m("ce", 0.7200)}


def _store(tmp_path) -> Storage:
    st = Storage(str(tmp_path / "r"))
    models = _models()
    gate = evaluate.gate("student", models["student"], 0.75, 0.02,
                         {"name": "baseline", "macro_f1": 0.6858, "interval": (0.01, 0.08),
                          "resampled": "65 queries"})
    st.write_json(f"data/{MANIFEST}", _manifest("data", {}, "d-data", {"rows_in": 2400}))
    st.write_json(f"student-crsd/{MANIFEST}", _manifest(
        "student-crsd", {"data": "d-data"}, "d-student",
        {"objective": "crsd", "seconds_per_step": 2.6, "best_val_macro_f1": 0.7012,
         "compared": {"ce": {"seconds_per_step": 1.3, "best_val_macro_f1": 0.6951}},
         "rows_from": {"annotations": 1800, "labels": 300}},
        {"model": "/store/r/student-crsd/model", "model_ce": "/store/r/student-crsd/compare/ce/model"}))
    ev = _manifest("evaluate", {"data": "d-data", "student-crsd": "d-student"}, "d-eval", {"gate": gate})
    ev["artifact"] = st.uri("evaluate/v-1")  # read where the manifest points
    st.write_json(f"evaluate/{MANIFEST}", ev)
    st.write_json("evaluate/v-1/metrics.json", {"eval_rows": 400, "models": models, "gate": gate,
                                                 "comparison": evaluate.comparison(models)})
    st.write_bytes("evaluate/v-1/confusion.png", b"\x89PNG fake-bytes")
    st.write_json("evaluate/metrics.json", {"models": {}})  # not the current version's: never read
    st.write_json(f"serve/{FAILURE}", {"stage": "serve", "error": "ValueError: <b>port</b> taken", "traceback": "Traceback ...", "at": "t2"})
    return st


def _text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_the_report_shows_gate_comparison_lineage_and_failures(tmp_path):
    st = _store(tmp_path)
    status = {"phase": "Failed", "stages": [{"name": "data", "phase": "Succeeded"}, {"name": "student-crsd", "phase": "Succeeded"},
                                             {"name": "evaluate", "phase": "Succeeded"}, {"name": "serve", "phase": "Failed",
                                                                                         "message": "ValueError: <b>port</b> taken"}]}
    uri = report.write(st, "r", ["data", "student-crsd", "evaluate", "serve"], status)
    assert uri == st.uri("report.html")
    page = st.read_text("report.html")
    text = " ".join(_text(page).split())
    # the first line says what the run is for: the student against the lexical baseline, before anything else
    headline = ("The student scores macro-F1 0.731 on held-out pairs, the lexical baseline 0.686: +4.5 points "
                "(90% paired-bootstrap interval over 65 queries +1.0 to +8.0); the gate did not pass.")
    assert headline in text and text.index(headline) < text.index("Evaluation")
    # the gate's verdict, with its reason (0.7306 < 0.75)
    assert "not passed — student macro-F1 0.7306 < minMacroF1 0.75; gain over the lexical baseline" in text
    # both verdicts, each with its own outcome
    assert "evaluation.minMacroF1 0.75: failed — student macro-F1 0.7306 < minMacroF1 0.75" in text
    assert ("evaluation.minGainOverBaseline 0.02: passed — gain over the lexical baseline (0.6858) +0.0448, "
            "90% paired-bootstrap interval over 65 queries [+0.0100, +0.0800], >= minGainOverBaseline 0.02") in text
    # the objectives compared: each objective's validation and eval macro-F1, step time and difference to ce
    assert "the run's student: the one trained with student.objective" in text
    assert "crsd (the run's student) 0.7012 0.7306 0.9000 0.7406 2.6000 +0.0106" in text
    assert "ce 0.6951 0.7200 0.9000 0.7300 1.3000 +0.0000" in text
    # what the student learned from (spec.student.trainOn)
    assert "learned from 1,800 teacher annotations and 300 labeled pairs" in text
    # lineage: which digest each stage was built from, and what it wrote
    assert "evaluate hash-evaluate d-eval data @ d-data student-crsd @ d-student" in text
    assert "model_ce: /store/r/student-crsd/compare/ce/model" in text
    # the failed stage says why; text from storage is escaped, never markup
    assert "<b>port</b>" not in page and "&lt;b&gt;port&lt;/b&gt;" in page
    assert "Failed" in text and "Traceback ..." in text
    assert page.count("data:image/png;base64,") == 1  # the confusion matrices embedded; no pruning plot here


def test_the_report_says_how_far_the_annotating_model_agreed_with_the_labels_it_explained(tmp_path):
    st = _store(tmp_path)
    m = st.read_json(f"student-crsd/{MANIFEST}")
    m["metrics"].update(rows_from={"labels": 120}, rows_rationalized=120, rows_unexplained_left_out=80)
    st.write_json(f"student-crsd/{MANIFEST}", m)
    st.write_json(f"rationalize/{MANIFEST}", _manifest("rationalize", {"data": "d-data"}, "d-rat", {
        "rows_in": 200, "labeled": 120, "quarantined": 80,
        "quarantine_reasons": {"disagrees with the given label": 78, "unparseable response": 2},
        "agreement_with_labels": {"answered": 198, "agreed": 120, "rate": 0.6061}}))
    report.write(st, "r", ["data", "rationalize", "student-crsd", "evaluate"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert "Its own label agreed on 60.6% of the 198 it answered: 120 pairs carry its reasoning" in text
    assert "disagrees with the given label 78, unparseable response 2" in text
    assert ("learned from 120 labeled pairs; 120 labeled pairs carried the annotating model's reasoning, "
            "80 it disagreed with were left out") in text


def test_the_report_gives_the_annotations_advice_when_max_tokens_cut_answers(tmp_path):
    from kubedistill.stages import annotate

    st = _store(tmp_path)
    metrics = {"rows_in": 100, "labeled": 80, "quarantined": 20, "labels": {"relevant": 80},
               "quarantine_reasons": {annotate.CUT: 18, "schema": 2}, "cut_at_max_tokens": 18}
    metrics["advice"] = annotate.cut_advice(metrics, 96)
    st.write_json(f"annotate/{MANIFEST}", _manifest("annotate", {"data": "d-data"}, "d-ann", metrics))
    report.write(st, "r", ["data", "annotate", "student-crsd", "evaluate"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert "Quarantined because: answer cut at maxTokens 18, schema 2." in text
    assert ("18 of 98 answers (18.4%) were cut at spec.annotation.maxTokens=96 before their label line and "
            "quarantined: raise spec.annotation.maxTokens") in text


def test_the_report_says_how_the_teachers_votes_split(tmp_path):
    st = _store(tmp_path)
    metrics = {"rows_in": 100, "labeled": 80, "quarantined": 20, "labels": {"relevant": 80},
               "quarantine_reasons": {"schema": 20},
               "votes": {"sampled": 320, "parse_rate": 0.975, "unanimous": 0.4125, "mean_top_share": 0.8}}
    st.write_json(f"annotate/{MANIFEST}", _manifest("annotate", {"data": "d-data"}, "d-ann", metrics))
    report.write(st, "r", ["data", "annotate", "student-crsd", "evaluate"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert ("the teacher answered each labeled pair 4 more time(s); 97.5% of the votes parsed. Every parsed vote gave "
            "the annotation's label on 41.2% of the pairs; the largest label share averages 80.0%.") in text


def test_the_report_says_how_many_chains_their_pair_refutes(tmp_path):
    from kubedistill.stages import synthetic

    st = _store(tmp_path)
    svc = {"service_tags": ["ramen"], "service_district": "Northgate", "service_price_level": 1}
    chain = "Royal Izakaya is a japanese restaurant in Northgate ($). It offers ramen, but it is in Northgate, not Northgate."
    rows = [{"pair_id": "a", "label": "partial", "reasoning": chain, **svc},
            {"pair_id": "b", "label": "relevant", "reasoning": "It offers ramen and meets every constraint.", **svc},
            {"pair_id": "c", "label": "partial", "reasoning": "It offers ramen, but it is in Harbor, not Northgate.",
             **{**svc, "service_district": "Harbor"}}]
    reference = {"a": "relevant", "b": "relevant", "c": "partial"}
    agree = {**annotate_agreement(rows, reference), "refuted_chains": synthetic.refuted_summary(rows, reference)}
    assert agree["refuted_chains"] == {
        "chains": 3, "refuted": 1, "share": 0.3333, "agreement_refuted": 0.0, "agreement_rest": 1.0,
        "claims": {"elsewhere": 1}, "example": f"{chain} (says it is in Northgate, not Northgate; it is in Northgate)"}
    metrics = {"rows_in": 3, "labeled": 3, "quarantined": 0, "labels": {"partial": 2, "relevant": 1},
               "agreement_with_reference": agree}
    st.write_json(f"annotate/{MANIFEST}", _manifest("annotate", {"data": "d-data"}, "d-ann", metrics))
    report.write(st, "r", ["data", "annotate", "student-crsd", "evaluate"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert ("33.3% of its chains (1 of 3) make a claim the pair's own service fields refute (elsewhere 1); they agree "
            "with the reference on 0.0%, the other chains on 100.0%. For example: Royal Izakaya") in text


def test_the_report_says_whether_the_reward_model_can_judge_its_teacher(tmp_path):
    st = _store(tmp_path)
    rm = {"pairwise_accuracy": {"label": 1.0, "format": 1.0}, "combined_pairwise_accuracy": 1.0, "own_answers_accuracy": 0.598}
    st.write_json(f"reward-model/{MANIFEST}", _manifest("reward-model", {"data": "d-data"}, "d-rm", rm))
    judged = {"mean_reward": 1.5, "label_accuracy": 0.895, "parse_rate": 1.0}
    dpo = {"before": {**judged, "reward_auc": 0.4685}, "after": {**judged, "reward_auc": 0.40}, "preference_pairs": 133,
           "preference_truth": {"chosen_right": 0.519, "rejected_right": 0.481, "ordered": 0.52}}
    st.write_json(f"teacher-dpo/{MANIFEST}", _manifest("teacher-dpo", {"reward-model": "d-rm"}, "d-dpo", dpo))
    report.write(st, "r", ["data", "reward-model", "teacher-dpo", "student-crsd", "evaluate"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert "combined 1.0000; on the teacher's own answers (held-out queries) 0.5980" in text
    assert ("The reward ranks the SFT teacher's right answers over its wrong ones with AUC 0.47 (0.5 is chance) — it "
            "cannot judge this teacher, and DPO by reward learns little but noise; the chosen response of DPO's 133 "
            "pairs gives the prompt's label in 52%, the rejected in 48%") in text
    # a reward model that ranks them well is not called blind; a manifest from before the check says nothing of it
    dpo["before"]["reward_auc"] = 0.81
    st.write_json(f"teacher-dpo/{MANIFEST}", _manifest("teacher-dpo", {"reward-model": "d-rm"}, "d-dpo", dpo))
    report.write(st, "r", ["data", "reward-model", "teacher-dpo", "student-crsd", "evaluate"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert "with AUC 0.81 (0.5 is chance); the chosen" in text and "cannot judge" not in text
    del dpo["before"]["reward_auc"]
    st.write_json(f"teacher-dpo/{MANIFEST}", _manifest("teacher-dpo", {"reward-model": "d-rm"}, "d-dpo", dpo))
    report.write(st, "r", ["data", "reward-model", "teacher-dpo", "student-crsd", "evaluate"], None)
    assert "ranks the SFT teacher's right answers" not in " ".join(_text(st.read_text("report.html")).split())


def annotate_agreement(rows: list[dict], reference: dict[str, str]) -> dict:
    from kubedistill.stages import annotate

    return annotate.label_agreement({r["pair_id"]: r["label"] for r in rows}, reference)


def test_the_report_shows_the_pruned_teacher_before_and_after_recovery_and_withholds_a_fit_on_too_few(tmp_path):
    st = _store(tmp_path)
    def m(acc: float, ppl: float) -> dict:
        return {"label_accuracy": acc, "perplexity": ppl, "generated_tokens_per_s": 900.0}
    st.write_json(f"prune-search/{MANIFEST}", _manifest("prune-search", {"data": "d-data"}, "d-pr", {
        "target_ratio": 0.25, "objective": "labelAccuracy", "evaluated": 11, "sampled": 8, "proposed": 2,
        "perplexity_vs_uniform_pct": -3.9,
        "predictor": {"kind": "gbdt", "r2": None, "kendall_tau": None, "n_train": 6, "n_test": 8,
                      "fit": "not enough samples: 8 architectures, a fit needs 16 (spec.pruning.sampledArchitectures)"},
        "base": {"params": 1000}, "searched": {"params": 750}, "uniform": {"params": 751},
        "held_out": {"prompts": 64, "disjoint_from_search": True, "base": m(0.92, 116.0),
                     "searched": {"pruned": m(0.11, 105.0), "recovered": m(0.81, 82.0)},
                     "uniform": {"pruned": m(0.25, 109.0), "recovered": m(0.70, 87.0)}},
        "recovery": {"enabled": True, "steps": 300, "rank": 8, "learning_rate": 0.003}}))
    report.write(st, "r", ["data", "prune-search"], None)
    text = " ".join(_text(st.read_text("report.html")).split())
    assert "Predictor (gbdt) not enough samples: 8 architectures, a fit needs 16" in text and "R² None" not in text
    assert "On 64 held-out eval prompts (prompts the search never saw). Recovery: LoRA rank 8" in text
    assert "searched pruned 0.1100 105.0000 900.0000" in text and "searched recovered 0.8100 82.0000" in text
    assert "uniform recovered 0.7000 87.0000" in text


def test_comparison_differences_are_to_the_ce_student():
    rows = evaluate.comparison(_models())
    assert [(r["objective"], r["served"], r["delta_macro_f1"]) for r in rows] == [("crsd", True, 0.0106), ("ce", False, 0.0)]
    only = {"baseline": _models()["baseline"], "student": _models()["student"]}
    assert evaluate.comparison(only) == []  # one student: nothing to compare


def test_flatten_nested_metrics():
    assert report.flatten({"a": {"b": 1, "c": {"d": 0.5}}, "e": [1, 2], "f": "x"}) == [
        ("a.b", 1), ("a.c.d", 0.5), ("e", "1, 2"), ("f", "x")]


def test_the_report_says_what_calibration_did_and_names_a_grade_never_predicted():
    import numpy as np

    from kubedistill import report
    from kubedistill.ml.metrics import classification_metrics

    labels = ["irrelevant", "partial", "relevant"]
    truth = ["irrelevant", "partial", "relevant", "relevant"]
    never_irrelevant = classification_metrics(truth, np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1],
                                                                [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]), labels)
    student = {**classification_metrics(truth, np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3, labels, [0.0, 0.5, 0.0]),
               "calibration": {"temperature": 1.5, "offsets": {"irrelevant": 0.0, "partial": 0.5, "relevant": 0.0},
                               "ece_before": 0.21, "macro_f1_argmax": 0.61}}
    html = report._calibration({"baseline": never_irrelevant, "student": student})
    assert "temperature 1.500 took the expected calibration error from 0.2100 to" in html
    assert "decision offsets partial +0.5 moved macro-F1 from 0.6100 (argmax) to 1.0000" in html
    assert "baseline never predicts irrelevant although the eval set holds it" in html
    assert "student never predicts" not in html


def test_the_report_links_each_stages_newest_driver_logs(tmp_path):
    from kubedistill.core import driverlog

    store = Storage(str(tmp_path / "run"))
    src = tmp_path / "x.log"
    src.write_text("Traceback ...\n")
    for name in ("20261201T000000Z-aaaaaaaa.log", "20261202T000000Z-bbbbbbbb.log"):
        driverlog.keep(store, "data", src, name)
    store.write_json(f"data/{FAILURE}", {"stage": "data", "error": "ValueError: no rows"})
    page = report.render("r1", store.uri(), ["data", "evaluate"], store)
    assert "<a href='data/logs/20261202T000000Z-bbbbbbbb.log'>latest</a>" in page
    assert "<a href='data/logs/20261201T000000Z-aaaaaaaa.log'>2</a>" in page
    assert "evaluate/logs/" not in page  # nothing kept for a stage that never ran
