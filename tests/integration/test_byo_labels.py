"""Bring your own labels (issue 29): the BYO-labels sample (`manifests/samples/byo-labels.yaml`) run on
SeaweedFS S3 with graded pairs that carry no reasoning, in each annotation mode, one run edited from mode to
mode: label (the LLM labels the log, answering each pair more than once, and a kd student learns the shares
of its answers), both (it also explains the graded pairs), rationalize (it only explains them). The annotating LLM is the tests' scratch teacher, which disagrees with a good share of the labels:
the agreement filter keeps its chain only where its own label is the given one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages import data
from kubedistill.stages.annotate import DISAGREES
from tests.conftest import SAMPLES, artifact
from tests.teacher_model import LABELS

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _jsonl(st: Storage, name: str, rows: list[dict]) -> None:
    st.write_text(name, "".join(json.dumps(r) + "\n" for r in rows))


def _sample(bucket: str, model: str, encoder: str) -> dict:
    """The sample as shipped, pointed at this test's bucket and sized for a CPU."""
    doc = yaml.safe_load((SAMPLES / "byo-labels.yaml").read_text())
    s = doc["spec"]
    s["storage"] = {"uri": f"s3://{bucket}/runs"}
    s["data"] = {"logs": f"s3://{bucket}/logs/", "evalSet": f"s3://{bucket}/eval/", "sftSeed": f"s3://{bucket}/graded/",
                 "format": "jsonl"}
    s["annotation"].update(model=model, engine="transformers", replicas={"min": 1, "max": 1}, gpusPerReplica=0,
                           cpusPerReplica=1, batchSize=32, maxTokens=96, maxQuarantinedFraction=0.9)
    s["student"].update(baseModel=encoder, compareObjectives=[], maxLength=48, maxReasoningTokens=24, patience=20,
                        train={"epochs": 1, "batchSize": 16, "learningRate": 1e-3},
                        resources={"workers": 1, "cpusPerWorker": 1})
    s["evaluation"] = {"minMacroF1": 0.0}
    s["serving"] = {"enabled": False}
    del s["ray"]
    return doc


def _run(doc: dict, ray_address: str, mode: str, train_on: str, objective: str = "crsd",
         votes: int = 0) -> tuple[list[tuple[str, str]], str]:
    doc["spec"]["annotation"].update(mode=mode, votes=votes)
    doc["spec"]["student"].update(trainOn=train_on, objective=objective)
    out = io.StringIO()
    status = runner.run_local(spec.parse_run(doc), address=ray_address, out=out)
    return [(s.name, s.phase) for s in status.stages], out.getvalue()


@pytest.mark.cost(300)
@pytest.mark.timeout(1800)  # three runs of four or five stage jobs each
def test_the_byo_labels_sample_runs_on_s3_in_each_annotation_mode(bucket, teacher, tiny_encoder, ray_address):
    models = Storage(f"s3://{bucket}/models/llm")
    for f in Path(teacher).iterdir():
        models.write_bytes(f.name, f.read_bytes())
    world = data.generate(LABELS, 80, 60, 5, 60, 60, seed=3)
    graded = [{k: v for k, v in r.items() if k not in ("reasoning", "pair_id")} for r in world.sft]  # no reasoning
    overlap = world.sft[:10]  # pairs both graded and in the log: the graded label wins
    log = [{k: r[k] for k in data.LOG_COLUMNS if k in r} for r in [*world.log[:50], *overlap]]
    _jsonl(Storage(f"s3://{bucket}/graded"), "graded.jsonl", graded)
    _jsonl(Storage(f"s3://{bucket}/logs"), "day-1.jsonl", log)
    _jsonl(Storage(f"s3://{bucket}/eval"), "eval.jsonl", world.eval)
    doc = _sample(bucket, models.uri(), tiny_encoder)
    st = Storage(f"s3://{bucket}/runs/byo-labels")

    def metrics(stage: str) -> dict:
        return st.read_json(f"{stage}/{MANIFEST}")["metrics"]

    # label: the LLM labels the log, answering each pair twice more (annotation.votes); the student learns
    # the shares of its answers (objective kd): they travel from the annotate stage's shards through the
    # student's splits into its loss unchanged
    stages, text = _run(doc, ray_address, "label", "annotations", objective="kd", votes=2)
    assert stages == [("data", "Succeeded"), ("annotate", "Succeeded"), ("student-crsd", "Succeeded"),
                      ("evaluate", "Succeeded")], text[-3000:]
    assert metrics("data")["sft"]["rows_written"] == 60  # graded pairs without reasoning are valid data
    annotated = metrics("annotate")["labeled"]
    assert metrics("annotate")["votes"]["sampled"] == 2 * annotated
    shares = {r["pair_id"]: r["label_probs"] for r in data.read_dataset(artifact(st, "annotate").child("labeled"))}
    assert any(max(p) < 1 for p in shares.values()), shares  # the teacher was not always sure of itself
    train = data.read_dataset(artifact(st, "student-crsd").child("splits/train"))
    assert train and all(r["label_probs"] == shares[r["pair_id"]] for r in train)
    m = metrics("student-crsd")
    assert m["rows_from"] == {"annotations": annotated} and m["objective"] == "kd" and m["step"] > 0
    assert "rows_rationalized" not in m

    # both: the log annotated and the graded pairs explained; the student learns from both sources
    stages, text = _run(doc, ray_address, "both", "both")
    assert stages == [("data", "Succeeded"), ("annotate", "Succeeded"), ("rationalize", "Succeeded"),
                      ("student-crsd", "Succeeded"), ("evaluate", "Succeeded")], text[-3000:]
    r = metrics("rationalize")
    agree = r["agreement_with_labels"]
    assert r["rows_in"] == 60 == r["labeled"] + r["quarantined"]
    assert 0 < agree["agreed"] == r["labeled"] < agree["answered"]  # this teacher agrees sometimes, not always
    assert r["quarantine_reasons"][DISAGREES] == agree["answered"] - agree["agreed"]
    out = artifact(st, "rationalize")
    explained = data.read_dataset(out.child("labeled"))
    by_pair = {data.pair_id(g["query"], g["service_id"]): g for g in graded}
    assert len(explained) == r["labeled"] and all(
        e["label"] == by_pair[e["pair_id"]]["label"] and e["reasoning"] for e in explained)  # the human label kept
    disagreed = [json.loads(x) for f in out.list("quarantine") for x in out.read_text(f).splitlines()]
    disagreed = [q for q in disagreed if q["reason"].startswith(DISAGREES)]
    assert len(disagreed) == r["quarantine_reasons"][DISAGREES]
    for q in disagreed:  # says which label the model gave, for which given label, and keeps its answer
        given = json.loads(q["raw"])["label"]
        assert f"the label is {given!r}" in q["reason"] and "Label:" in q["response"]
    annotated_now = data.read_dataset(artifact(st, "annotate").child("labeled"))
    shadowed = sum(1 for a in annotated_now if a["pair_id"] in by_pair)  # graded pairs the LLM also labeled
    assert shadowed > 0
    m = metrics("student-crsd")
    # crsd trains on rows with reasoning: the explained graded pairs and the annotations of other pairs
    assert m["rows_from"] == {"annotations": len(annotated_now) - shadowed, "labels": r["labeled"]}
    assert m["rows_rationalized"] == r["labeled"] and m["rows_unexplained_left_out"] == 60 - r["labeled"]
    assert "left out: crsd needs reasoning" in text
    page = st.read_text("report.html")
    assert "<h2>Rationalization</h2>" in page and "carried the annotating model's reasoning" in page

    # rationalize: only the graded pairs, explained; no log annotation
    stages, text = _run(doc, ray_address, "rationalize", "labels")
    assert stages == [("data", "Succeeded"), ("rationalize", "Succeeded"), ("student-crsd", "Succeeded"),
                      ("evaluate", "Succeeded")], text[-3000:]
    assert "data: done earlier, skipped" in text  # the edit changed what the LLM does, not the data
    m = metrics("student-crsd")
    assert m["rows_from"] == {"labels": metrics("rationalize")["labeled"]}
    assert m["train_rows"] + m["val_rows"] == metrics("rationalize")["labeled"]
