"""The student-crsd stage on a real local Ray cluster: Ray Train DDP with 2 CPU workers, export,
evaluate scoring the student. (Resume after the run is killed mid-training: test_student_resume.py.)"""

from __future__ import annotations

import io

import pytest

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages.data import read_dataset
from tests.conftest import artifact, minimal_doc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OFF = {"teacher": {"enabled": False}, "annotation": {"enabled": False}, "pruning": {"enabled": False},
       "serving": {"enabled": False}}


def _doc(uri: str, name: str, encoder: str, synthetic: dict, train: dict) -> dict:
    doc = minimal_doc(storage={"uri": uri}, data={"synthetic": synthetic}, **OFF,
                      student={"baseModel": encoder, "maxLength": 48, "maxReasoningTokens": 24,
                               "train": {"batchSize": 16, "learningRate": 1e-3, **train},
                               "patience": 20, "resources": {"workers": 2}})
    doc["metadata"]["name"] = name
    return doc


@pytest.mark.cost(105)
def test_student_trains_with_ddp_exports_and_is_evaluated_beside_a_ce_student(bucket, tiny_encoder, ray_address):
    syn = {"services": 60, "queries": 40, "pairsPerQuery": 5, "sftSize": 120, "evalSize": 60, "seed": 1}
    doc = _doc(f"s3://{bucket}/runs", "stu", tiny_encoder, syn, {"epochs": 2})
    doc["spec"]["student"]["compareObjectives"] = ["ce"]
    doc["spec"]["student"]["select"] = "validation"
    doc["spec"]["student"]["validateOn"] = "sftSeed"  # rounds, calibration, choice and offsets on true labels
    doc["spec"]["student"]["validationFraction"] = 0.3
    doc["spec"]["student"]["train"]["classWeights"] = "balanced"
    doc["spec"]["student"]["calibration"] = {"offsets": True}
    run = spec.parse_run(doc)
    out = io.StringIO()
    status = runner.run_local(run, address=ray_address, out=out)
    assert [(s.name, s.phase) for s in status.stages] == [("data", "Succeeded"), ("student-crsd", "Succeeded"),
                                                           ("evaluate", "Succeeded")]
    st = Storage(f"s3://{bucket}/runs/stu")
    m = st.read_json(f"student-crsd/{MANIFEST}")["metrics"]
    # select: validation: the run's student is the better of the two on the validation split (ties to crsd)
    val = m["selected"]["best_val_macro_f1"]
    chosen, other = ("crsd", "ce") if val["crsd"] >= val["ce"] else ("ce", "crsd")
    assert m["selected"] == {"by": "validation", "objective": chosen, "best_val_macro_f1": val}
    assert m["objective"] == chosen and m["step"] > 0 and m["best_val_macro_f1"] == val[chosen]
    student = artifact(st, "student-crsd")
    assert {"model/student.json", "model/head.safetensors"} <= set(student.list("model"))
    # validateOn: sftSeed: the validation split is held-out queries of the SFT set, none of them trained on
    sft_ids = {r["pair_id"] for r in read_dataset(artifact(st, "data").child("sft"))}
    val_rows, train_rows = read_dataset(student.child("splits/val")), read_dataset(student.child("splits/train"))
    assert val_rows and {r["pair_id"] for r in val_rows} <= sft_ids
    assert {r["query"] for r in val_rows}.isdisjoint({r["query"] for r in train_rows})
    assert m["val_rows"] == len(val_rows) and "held-out queries of the SFT set" in m["validated_on"]
    report = artifact(st, "evaluate").read_json("metrics.json")
    # the baseline weighted like the student, and unweighted beside it (weighting may cost it points)
    assert set(report["models"]) == {"baseline", "baseline_unweighted", "student", f"student_{other}"}
    assert report["gate"]["candidate"] == "student"
    # the gate compares too: the student's gain over the stronger of the two baselines, with its interval
    floor, compare = report["gate"]["checks"]
    strongest = max(("baseline", "baseline_unweighted"), key=lambda n: report["models"][n]["macro_f1"])
    assert floor["rule"] == "minMacroF1" and compare["rule"] == "minGainOverBaseline"
    assert compare["baseline"] == strongest
    assert compare["value"] == round(report["models"]["student"]["macro_f1"] - report["models"][strongest]["macro_f1"], 4)
    assert compare["interval"][0] <= compare["interval"][1]
    # the interval resamples whole queries: a query's pairs stand or fall together
    eval_queries = {r["query"] for r in read_dataset(artifact(st, "data").child("eval"))}
    assert compare["resampled"] == f"{len(eval_queries)} queries" and len(eval_queries) < report["eval_rows"]
    assert report["gate"]["passed"] == (floor["passed"] and compare["passed"])
    text = out.getvalue()
    assert "val macro-F1" in text
    # each worker line once (Ray Train's print patch printed them twice), and progress per step from rank 0
    rounds = [line for line in text.splitlines() if "[student-crsd] step " in line]
    assert rounds and len(rounds) == len(set(rounds)), rounds
    assert "student-crsd ▸ crsd student: " in text and "student-crsd ▸ ce student: " in text
    final = st.read_json("student-crsd/_PROGRESS.json")  # the last loop's last report (the CE student's)
    assert final["done"] == m["compared"].get("ce", m)["step"] <= final["total"] and final["label"] == "ce student"
    # the other student: same splits and budget, its own export, scored beside the run's student, not served
    assert m["compared"][other]["step"] == m["step"]
    assert m["compared"][other]["best_val_macro_f1"] == val[other]
    beside = student.read_json(f"compare/{other}/model/student.json")
    assert beside["objective"] == other and beside["trainedOn"] == student.read_json("model/student.json")["trainedOn"]
    assert student.read_json("model/student.json")["objective"] == chosen
    rows = {r["objective"]: r for r in report["comparison"]}
    assert rows[chosen]["served"] and not rows[other]["served"]
    assert rows["crsd"]["delta_macro_f1"] == round(rows["crsd"]["macro_f1"] - rows["ce"]["macro_f1"], 4)
    assert rows[other]["macro_f1"] == report["models"][f"student_{other}"]["macro_f1"]
    # calibration: fitted on the validation split alone (its pairs' digest), stored with the model, scored on eval
    from kubedistill.stages.student import rows_digest

    meta = student.read_json("model/student.json")
    val = read_dataset(student.child("splits/val"))
    assert meta["calibration"]["fittedOn"] == "validation" and meta["calibration"]["rows"] == len(val)
    assert meta["calibration"]["pairsDigest"] == rows_digest(val) and m["calibration"] == meta["calibration"]
    assert meta["calibration"]["temperature"] > 0 and set(meta["calibration"]["offsets"]) == set(run.spec.labels)
    served = report["models"]["student"]
    assert served["calibration"]["temperature"] == meta["calibration"]["temperature"]
    assert 0 <= served["ece"] <= 1 and 0 <= served["calibration"]["ece_before"] <= 1
    assert report["models"]["baseline"]["offsets"]["irrelevant"] == 0.0  # the baseline fitted its own
    assert artifact(st, "evaluate").read_bytes("reliability.png")[:4] == b"\x89PNG"
    page = st.read_text("report.html")
    assert "<h3>Objectives compared</h3>" in page and f"{chosen} (the run's student)" in page
    assert "student.select: validation" in page and "Validation: " in page and "of the SFT set" in page
