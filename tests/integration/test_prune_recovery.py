"""The prune-search stage's recovery and the pruned teacher as annotator, through `kubedistill run` on a real local
Ray and SeaweedFS S3: the test teacher (a scratch Llama trained on the teacher's format) pruned by the task-aware
search (Ray Tune trials), the searched and the uniform model tuned with LoRA (Ray Train, 2 CPU workers), the run
killed at a recovery checkpoint and resumed from it, the merged model saved on S3 and labeling the log there on the
transformers engine. One run for all of it: each part costs minutes on 2 cores."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.ml import prune
from kubedistill.ml.models import resolve
from kubedistill.stages.teacher import lm
from tests.conftest import artifact, minimal_doc
from tests.integration.test_runner import _cli, _write, kill_at

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SYNTHETIC = {"services": 60, "queries": 40, "pairsPerQuery": 4, "sftSize": 200, "evalSize": 48, "seed": 3}
PRUNING = {"targetRatio": 0.25, "sampledArchitectures": 8, "topK": 1, "candidates": 200, "evalTexts": 16,
           "evalPrompts": 16, "objective": "labelAccuracy"}
RECOVERY = {"steps": 25, "batchSize": 8, "learningRate": 2e-3, "rank": 4, "alpha": 8, "candidates": 2}


def _doc(uri: str, name: str, teacher: str, recovery: dict, **more: dict) -> dict:
    doc = minimal_doc(
        storage={"uri": uri}, data={"synthetic": SYNTHETIC},
        # fp32: at this test's tiny shapes bf16 autocast (auto, on a CPU with AVX-512 BF16) gains nothing and its
        # casts cost ~40 s of CI; bf16 training is exercised by the teacher-stages and student tests
        # (and the search judges answers of 96 tokens, as before teacher.maxNewTokens: the test teacher's end by 60)
        teacher={"enabled": False, "resources": {"workers": 2, "cpusPerWorker": 1, "precision": "fp32"},
                 "maxNewTokens": 96},
        pruning={**PRUNING, "model": teacher, "recovery": recovery},
        student={"enabled": False}, serving={"enabled": False}, **more)
    doc["metadata"]["name"] = name
    return doc


def _checkpointed(run: Storage, stage: str) -> Callable[[], bool]:
    """Ray Train has recorded a checkpoint of one of the stage's trainings (its manager's snapshot, on S3)."""
    def check() -> bool:
        for key in run.list(stage):
            if key.endswith("checkpoint_manager_snapshot.json"):
                try:
                    if json.loads(run.read_text(key)).get("latest_checkpoint_result"):
                        return True
                except ValueError:  # being written
                    pass
        return False
    return check


@pytest.mark.cost(280)
@pytest.mark.timeout(1200)
def test_a_pruned_teacher_recovers_resumes_after_a_kill_and_annotates_the_log_from_s3(bucket, teacher, tmp_path):
    # `kubedistill run` on S3: the search, then recovery of 25 steps with a checkpoint every 20, killed once the
    # first is registered; the rerun resumes it (5 steps left), recovers the uniform model, and annotates with it
    annotation = {"model": "prune-search", "engine": "auto", "batchSize": 64, "maxTokens": 96}
    f = _write(tmp_path, _doc(f"s3://{bucket}/runs", "prunerec", teacher, RECOVERY, annotation=annotation))
    st = Storage(f"s3://{bucket}/runs/prunerec")
    kill_at(f, "train.checkpoint-reported", until=_checkpointed(st, "prune-search"))
    assert not st.exists(f"prune-search/{MANIFEST}") and not st.exists(f"annotate/{MANIFEST}")
    again = _cli("run", str(f))
    text, _ = again.communicate(timeout=900)
    assert again.returncode == 0, text[-4000:]
    assert "data: done earlier, skipped" in text
    assert "[lm] resuming from checkpoint at step 20" in text, text[-3000:]
    # the graph put the search (and its recovery) before the annotator it makes
    assert text.index("prune-search: succeeded") < text.index("annotate: running")

    m = st.read_json(f"prune-search/{MANIFEST}")["metrics"]
    assert m["objective"] == "labelAccuracy" and m["evaluated"] == 1 + 8 + 1
    assert m["evaluated_this_run"] == 0  # every architecture's result was persisted before the kill
    # 8 sampled architectures are too few for a fit to mean anything: said, not printed as an R^2
    assert m["predictor"]["r2"] is None and m["predictor"]["fit"].startswith("not enough samples: 8 architectures")
    train = m["recovery"]["train"]
    # the search's best two and the uniform baseline, each tuned for the same budget; the first was killed
    assert set(train) == {"candidate-0", "candidate-1", "uniform"}
    assert [train[k]["resumed_at_step"] for k in ("candidate-0", "candidate-1", "uniform")] == [20, 0, 0]
    assert all(t["step"] == 25 and t["workers"] == 2 for t in train.values())
    cands = m["recovery"]["candidates"]  # judged after recovery on the search's prompts: the best is the model
    assert [c["name"] for c in cands] == ["candidate-0", "candidate-1"] and sum(c["chosen"] for c in cands) == 1
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["after_recovery"]["label_accuracy"] == max(c["after_recovery"]["label_accuracy"] for c in cands)
    held = m["held_out"]
    assert held["prompts"] == 16 and held["disjoint_from_search"]  # eval rows 16..31, the search used 0..15
    for which in ("searched", "uniform"):  # both pruned, both tuned for the same budget, measured before and after
        for when in ("pruned", "recovered"):
            assert 0 <= held[which][when]["label_accuracy"] <= 1 and held[which][when]["perplexity"] > 0
            assert held[which][when]["generated_tokens_per_s"] > 0
        # recovery learned the SFT set: held-out perplexity falls (LoRA on every projection)
        assert held[which]["recovered"]["perplexity"] < held[which]["pruned"]["perplexity"], held
    v = artifact(st, "prune-search")
    assert any("/checkpoint_" in f for f in v.list("ray"))  # recovery checkpoints, on S3
    # the merged model under model/ loads with the standard loader, in the searched shape, no adapter left
    model, _ = lm.load(v.uri("model"), "test", st.options)
    assert type(model).__name__ == "PrunedLlamaForCausalLM" and prune.param_count(model) == m["searched"]["params"]
    assert m["searched"]["label_accuracy"] == chosen["before_recovery"]["label_accuracy"]  # the summary is the chosen one
    assert not any("lora" in n for n in model.state_dict())
    assert prune.is_pruned(resolve(v.uri("pruned/uniform"), "test", st.options))  # recovery's inputs are kept

    ann = st.read_json(f"annotate/{MANIFEST}")["metrics"]
    assert ann["engine"] == "transformers" and "pruned teacher" in ann["engine_reason"]
    assert ann["rows_in"] == 160 == ann["labeled"] + ann["quarantined"]
    agree = ann["agreement_with_reference"]
    assert 0 <= agree["accuracy"] <= 1 and agree["pairs"] == ann["labeled"], ann
    # the classic world's chains are checked against their pairs: how many make a claim the pair refutes
    ref = agree["refuted_chains"]
    assert ref["chains"] == agree["pairs"] and 0 <= ref["refuted"] <= ref["chains"]
    assert sum(ref["claims"].values()) >= ref["refuted"] and bool(ref["example"]) == bool(ref["refuted"])
