"""The prune-search stage's recovery and the pruned teacher as annotator, on a real local Ray: the test teacher
(a scratch Llama trained on the teacher's format) pruned by the task-aware search (Ray Tune trials), the searched
and the uniform model tuned with LoRA (Ray Train, 2 CPU workers), the merged model saved on SeaweedFS S3 and
labeling the log there on the transformers engine; and a run killed at a recovery checkpoint resuming from it."""

from __future__ import annotations

import io

import pytest

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.ml import prune
from kubedistill.ml.models import resolve
from kubedistill.stages.teacher import lm
from tests.conftest import artifact, minimal_doc
from tests.integration.test_runner import _write, checkpoint_registered, kill_at

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SYNTHETIC = {"services": 60, "queries": 40, "pairsPerQuery": 4, "sftSize": 200, "evalSize": 48, "seed": 3}
PRUNING = {"targetRatio": 0.25, "sampledArchitectures": 8, "topK": 1, "candidates": 200, "evalTexts": 16,
           "evalPrompts": 16, "objective": "labelAccuracy"}
RECOVERY = {"steps": 24, "batchSize": 8, "learningRate": 2e-3, "rank": 4, "alpha": 8}


def _doc(uri: str, name: str, teacher: str, recovery: dict, **more: dict) -> dict:
    doc = minimal_doc(
        storage={"uri": uri}, data={"synthetic": SYNTHETIC},
        teacher={"enabled": False, "resources": {"workers": 2, "cpusPerWorker": 1}},
        pruning={**PRUNING, "model": teacher, "recovery": recovery},
        student={"enabled": False}, serving={"enabled": False}, **more)
    doc["metadata"]["name"] = name
    return doc


@pytest.mark.cost(150)
@pytest.mark.timeout(900)
def test_the_pruned_teacher_recovers_and_annotates_the_log_from_s3(bucket, teacher, ray_address):
    annotation = {"model": "prune-search", "engine": "auto", "batchSize": 64, "maxTokens": 96}
    run = spec.parse_run(_doc(f"s3://{bucket}/runs", "prunerec", teacher, RECOVERY, annotation=annotation))
    status = runner.run_local(run, address=ray_address, out=io.StringIO())
    # the graph puts the search (and its recovery) before the annotator it makes
    assert [(s.name, s.phase) for s in status.stages] == [
        ("data", "Succeeded"), ("prune-search", "Succeeded"), ("annotate", "Succeeded"), ("evaluate", "Succeeded")]
    st = Storage(f"s3://{bucket}/runs/prunerec")
    m = st.read_json(f"prune-search/{MANIFEST}")["metrics"]
    assert m["objective"] == "labelAccuracy" and m["evaluated"] == 1 + 8 + 1
    # 8 sampled architectures are too few for a fit to mean anything: said, not printed as an R^2
    assert m["predictor"]["r2"] is None and m["predictor"]["fit"].startswith("not enough samples: 8 architectures")
    held = m["held_out"]
    assert held["prompts"] == 16 and held["disjoint_from_search"]  # eval rows 16..31, the search used 0..15
    for which in ("searched", "uniform"):  # both pruned, both tuned for the same budget, measured before and after
        for when in ("pruned", "recovered"):
            assert 0 <= held[which][when]["label_accuracy"] <= 1 and held[which][when]["perplexity"] > 0
            assert held[which][when]["generated_tokens_per_s"] > 0
        assert m["recovery"]["train"][which]["step"] == 24 and m["recovery"]["train"][which]["workers"] == 2
    # recovery learned the SFT set: held-out perplexity falls for both (LoRA on every projection)
    assert held["searched"]["recovered"]["perplexity"] < held["searched"]["pruned"]["perplexity"]
    assert held["uniform"]["recovered"]["perplexity"] < held["uniform"]["pruned"]["perplexity"]
    v = artifact(st, "prune-search")
    assert any("/checkpoint_" in f for f in v.list("ray"))  # recovery checkpoints, on S3
    # the merged model under model/ loads with the standard loader, in the searched shape, no adapter left
    model, _ = lm.load(v.uri("model"), "test", st.options)
    assert type(model).__name__ == "PrunedLlamaForCausalLM" and prune.param_count(model) == m["searched"]["params"]
    assert not any("lora" in n for n in model.state_dict())
    assert prune.is_pruned(resolve(v.uri("pruned/uniform"), "test", st.options))  # recovery's inputs are kept

    ann = st.read_json(f"annotate/{MANIFEST}")["metrics"]
    assert ann["engine"] == "transformers" and "pruned teacher" in ann["engine_reason"]
    assert ann["rows_in"] == 160 == ann["labeled"] + ann["quarantined"]
    assert 0 <= ann["agreement_with_reference"]["accuracy"] <= 1 and ann["agreement_with_reference"]["pairs"] > 0, ann


@pytest.mark.cost(150)
@pytest.mark.timeout(900)
def test_a_recovery_killed_at_its_checkpoint_resumes_from_it(tmp_path, teacher):
    # 25 steps, a checkpoint every 20: killed once the first is registered, the restart has 5 left
    recovery = {**RECOVERY, "steps": 25}
    store = tmp_path / "store"
    doc = _doc(str(store), "recresume", teacher, recovery, annotation={"enabled": False})
    doc["spec"]["pruning"] |= {"evalTexts": 4, "evalPrompts": 4}  # what is measured is not this test's concern
    f = _write(tmp_path, doc)
    kill_at(f, "train.checkpoint-reported", until=checkpoint_registered(store / "recresume" / "prune-search"))
    assert not (store / "recresume" / "prune-search" / MANIFEST).exists()
    text = kill_at(f, "prune-search.manifest-written")
    assert "data: done earlier, skipped" in text
    assert "[lm] resuming from checkpoint at step 20" in text, text[-3000:]
    m = Storage(str(store / "recresume")).read_json(f"prune-search/{MANIFEST}")["metrics"]
    assert m["evaluated_this_run"] == 0  # every architecture's result was persisted before the kill
    assert m["recovery"]["train"]["searched"]["resumed_at_step"] == 20
    assert m["recovery"]["train"]["uniform"]["resumed_at_step"] == 0  # never started before the kill: a fresh run
