"""The four teacher stages on a real local Ray cluster (Ray Train DDP, 2 CPU workers) with a scratch
Llama: artifacts and checkpoints on SeaweedFS S3, the numbers each stage must report, a killed
training job resuming from its checkpoint, and a base model that cannot be loaded."""

from __future__ import annotations

import io

import pytest

from kubedistill import runner, spec
from kubedistill.stage import FAILURE, MANIFEST
from kubedistill.storage import Storage
from tests.conftest import minimal_doc
from tests.integration.test_runner import _cli, _write, kill_when_checkpointed

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OFF = {"annotation": {"enabled": False}, "student": {"enabled": False}, "pruning": {"enabled": False},
       "serving": {"enabled": False}}
TEACHER = {
    "baseModel": "scratch:llama-tiny",
    "dapt": {"epochs": 2, "batchSize": 16, "learningRate": 3e-3},
    "sft": {"epochs": 10, "batchSize": 16, "learningRate": 3e-3},
    "rewardModel": {"epochs": 2, "batchSize": 16, "learningRate": 1e-3},
    "dpo": {"epochs": 2, "batchSize": 8, "learningRate": 1e-4, "samplesPerPrompt": 4, "margin": 0.1},
    "resources": {"workers": 2, "cpusPerWorker": 1},
}
# the quickstart's data (a smaller set makes DPO's effect on this tiny model a coin toss), fewer eval pairs
SYNTHETIC = {"services": 300, "queries": 400, "pairsPerQuery": 6, "sftSize": 300, "evalSize": 100, "seed": 0}
SMALL = {"services": 80, "queries": 80, "pairsPerQuery": 4, "sftSize": 20, "evalSize": 10, "seed": 0}


def _doc(uri: str, name: str, teacher: dict, synthetic: dict = SYNTHETIC) -> dict:
    doc = minimal_doc(storage={"uri": uri}, data={"synthetic": synthetic}, teacher=teacher, **OFF)
    doc["metadata"]["name"] = name
    return doc


def test_the_teacher_stages_train_on_s3_and_report_what_they_must(bucket):
    run = spec.parse_run(_doc(f"s3://{bucket}/runs", "teach", TEACHER))
    out = io.StringIO()
    status = runner.run_local(run, out=out)
    assert [(s.name, s.phase) for s in status.stages][:5] == [
        ("data", "Succeeded"), ("teacher-dapt", "Succeeded"), ("teacher-sft", "Succeeded"),
        ("reward-model", "Succeeded"), ("teacher-dpo", "Succeeded")]
    st = Storage(f"s3://{bucket}/runs/teach")
    m = {s: st.read_json(f"{s}/{MANIFEST}")["metrics"] for s in ("teacher-dapt", "teacher-sft", "reward-model", "teacher-dpo")}
    assert m["teacher-dapt"]["perplexity_after"] < m["teacher-dapt"]["perplexity_before"]
    assert m["teacher-sft"]["eval"]["parse_rate"] >= 0.95, m["teacher-sft"]
    acc = m["reward-model"]["pairwise_accuracy"]
    assert set(acc) == {"label", "consistency", "faithfulness", "format"} and all(0 <= a <= 1 for a in acc.values())
    assert m["reward-model"]["combined_pairwise_accuracy"] > 0.5
    dpo = m["teacher-dpo"]
    assert dpo["preference_pairs"] > 0 and dpo["after"]["mean_reward"] > dpo["before"]["mean_reward"], dpo
    for s in ("teacher-dapt", "teacher-sft", "teacher-dpo"):  # each a loadable save_pretrained model
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.rsplit("/", 1)[-1] for f in st.list(f"{s}/model")}
    assert {"reward.json", "reward_heads.safetensors"} <= {f.rsplit("/", 1)[-1] for f in st.list("reward-model/model")}
    assert any("/checkpoint_" in f for f in st.list("teacher-sft/ray"))  # checkpoints on S3
    assert "held-out perplexity" in out.getvalue()


def test_a_killed_teacher_training_resumes_from_its_checkpoint(tmp_path):
    teacher = {**TEACHER, "dapt": {"epochs": 60, "batchSize": 16, "learningRate": 1e-3}}
    syn = SMALL
    f = _write(tmp_path, _doc(str(tmp_path / "store"), "tresume", teacher, syn))
    pattern = str(tmp_path / "store" / "tresume" / "teacher-dapt" / "ray" / "*" / "checkpoint_*")
    kill_when_checkpointed(f, pattern)
    assert not (tmp_path / "store" / "tresume" / "teacher-dapt" / MANIFEST).exists()
    again = _cli("run", str(f))
    text, _ = again.communicate(timeout=900)
    assert again.returncode == 0, text[-3000:]
    assert "data: done earlier, skipped" in text
    assert "[lm] resuming from checkpoint at step" in text, text[-3000:]


def test_a_base_model_that_cannot_be_loaded_fails_the_stage_naming_the_field(tmp_path):
    run = spec.parse_run(_doc(str(tmp_path / "store"), "nobase", {**TEACHER, "baseModel": str(tmp_path / "nothing-here")},
                              SMALL))
    with pytest.raises(runner.RunFailed, match="spec.teacher.baseModel") as e:
        runner.run_local(run, out=io.StringIO())
    assert e.value.stage == "teacher-dapt"
    st = Storage(str(tmp_path / "store" / "nobase"))
    assert st.exists(f"teacher-dapt/{FAILURE}") and not st.exists(f"teacher-dapt/{MANIFEST}")
    assert not st.list("teacher-dapt/model")
