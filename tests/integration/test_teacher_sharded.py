"""FSDP against DDP for the teacher's training loop, on 2 CPU workers over gloo (real Ray Train, real FSDP2):
the same losses and weights within a stated tolerance, and a sharded checkpoint written by 2 workers that a
retried job resumes on 1 (torch.distributed.checkpoint re-shards on load)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kubedistill.core.spec import LoraSpec, Resources, TrainSpec
from kubedistill.core.storage import Storage
from kubedistill.ml import raytrain, sharded
from kubedistill.ml.raytrain import STATE_FILE
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm, train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LABELS = ["irrelevant", "partial", "relevant"]
#: DDP averages gradients with all-reduce, FSDP with reduce-scatter: the same sums in another order, in fp32 (under
#: bf16 autocast each strategy rounds its products in its own places: weights 1e-3 to 6e-3 apart after 3 steps)
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kubedistill.runner import local_ray

    tmp = tmp_path_factory.mktemp("sharded")
    g = data.generate(LABELS, 120, 40, 4, 60, 10, seed=0)
    rows = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in g.sft]
    model, tok = lm.scratch("scratch:llama-tiny", [r["text"] for r in g.corpus] + [r["prompt"] + r["response"] for r in rows])
    lm.save(model, tok, Storage(str(tmp / "start")))
    data.write_rows(Storage(str(tmp / "examples")), "part-00000", rows, "jsonl")
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": rows[(i + 7) % len(rows)]["response"],
              "dimension": "label"} for i, r in enumerate(rows)]
    data.write_rows(Storage(str(tmp / "pairs")), "part-00000", pairs, "jsonl")
    with local_ray(num_cpus=2):
        yield tmp


def _cfg(tmp: Path, strategy: str, steps: int, **kw) -> train.TrainConfig:
    return train.TrainConfig(task="lm", start=str(tmp / "start"), examples_uri=str(tmp / "examples"),
                             train=TrainSpec(epochs=1, learning_rate=3e-3, batch_size=8, max_steps=steps),
                             strategy=strategy, checkpoint_every=2, max_length=128, precision="fp32", **kw)


def _fit(tmp: Path, cfg: train.TrainConfig, name: str, workers: int = 2):
    result = raytrain.fit(train.train_loop_per_worker, {"train": cfg}, Resources(workers=workers, cpus_per_worker=1),
                          Storage(str(tmp / "ray")), name, max_failures=0)
    model, _, _ = train.build(cfg, None, reference=False)
    sharded.load_model(result.checkpoint, model)
    return result, model


def _check_parity(ddp, ddp_model, fsdp, fsdp_model, start, lora: bool) -> list[str]:
    """Assert the two runs agree; the names of the weights training moved."""
    assert ddp.metrics["strategy"] == "ddp" and fsdp.metrics["strategy"] == "fsdp"
    assert fsdp.metrics["loss"] == pytest.approx(ddp.metrics["loss"], rel=LOSS_RTOL)
    with ddp.checkpoint.as_directory() as d:
        assert (Path(d) / STATE_FILE).is_file()
    with fsdp.checkpoint.as_directory() as d:  # one shard per worker, gathered by Ray Train into one checkpoint
        assert sorted(p.name for p in Path(d).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    a, b = ddp_model.state_dict(), fsdp_model.state_dict()
    assert set(a) == set(b)
    moved = [k for k in a if "lora_B" in k] if lora else [k for k in a if not torch.equal(a[k], start[k])]
    assert moved and all(a[k].abs().sum() > 0 for k in moved), "training changed nothing"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0)
    return moved


@pytest.fixture(scope="module")
def full(setup):
    """DDP and FSDP, full fine-tuning, 4 steps each on 2 workers."""
    ddp = _fit(setup, _cfg(setup, "ddp", 4), "ddp-full")
    fsdp = _fit(setup, _cfg(setup, "fsdp", 4), "fsdp-full")
    return ddp, fsdp


@pytest.mark.cost(150)
def test_fsdp_trains_what_ddp_trains(setup, full):
    (ddp, ddp_model), (fsdp, fsdp_model) = full
    start = lm.load(str(setup / "start"), "start")[0].state_dict()
    assert _check_parity(ddp, ddp_model, fsdp, fsdp_model, start, lora=False)


def test_fsdp_trains_what_ddp_trains_with_lora_and_gradient_checkpointing(setup):
    kw = {"lora": LoraSpec(r=4, alpha=8, dropout=0.0), "gradient_checkpointing": True}
    ddp, ddp_model = _fit(setup, _cfg(setup, "ddp", 4, **kw), "ddp-lora")
    fsdp, fsdp_model = _fit(setup, _cfg(setup, "fsdp", 4, **kw), "fsdp-lora")
    assert all("lora_B" in k for k in _check_parity(ddp, ddp_model, fsdp, fsdp_model, {}, lora=True))


def test_a_sharded_checkpoint_of_2_workers_resumes_on_1(setup, full):
    _, (first, _) = full
    assert (first.metrics["step"], first.metrics["resumed_at_step"], first.metrics["workers"]) == (4, 0, 2)
    # the retried job: the same name (so the same checkpoints), now on 1 worker, to 6 steps
    again, model = _fit(setup, _cfg(setup, "fsdp", 6), "fsdp-full", workers=1)
    assert (again.metrics["step"], again.metrics["resumed_at_step"], again.metrics["workers"]) == (6, 4, 1)
    with again.checkpoint.as_directory() as d:
        assert sorted(p.name for p in Path(d).glob("*.distcp")) == ["__0_0.distcp"]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.parametrize("task", ["reward", "dpo"])
def test_fsdp_trains_what_ddp_trains_for_the_reward_model_and_dpo(setup, task):
    """The reward model (backbone layers sharded, heads in the root unit) and DPO (the frozen reference sharded
    too) under FSDP give DDP's loss and weights."""
    kw = {"examples_uri": str(setup / "pairs"), "task": task, "dimensions": ("label",), "beta": 0.1}
    ddp, ddp_model = _fit(setup, replace(_cfg(setup, "ddp", 3), **kw), f"ddp-{task}")
    fsdp, fsdp_model = _fit(setup, replace(_cfg(setup, "fsdp", 3), **kw), f"fsdp-{task}")
    assert fsdp.metrics["loss"] == pytest.approx(ddp.metrics["loss"], rel=LOSS_RTOL)
    a, b = ddp_model.state_dict(), fsdp_model.state_dict()
    assert set(a) == set(b) and (task != "reward" or "heads.weight" in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0)
