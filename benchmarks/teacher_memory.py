"""Teacher memory: `kubedistill plan`'s per-worker estimate (kubedistill.core.memory) against the peak each training
worker measured, on this machine's CPU, for every training task and both strategies.

Each configuration runs the teacher stages' own Ray Train loop (`train.train_loop_per_worker`) on 2 CPU workers
for a few steps on a scratch Llama large enough that its state dominates the process (about 30 M parameters:
~120 MB of fp32 weights, ~600 MB of DDP training state). A worker measures its peak resident memory (Linux
VmHWM) minus what it held when the loop began (Python, torch, Ray: not the training's), and the run reports the
largest over its workers. The estimate is `memory.estimate(...).peak(gpu=False)` for the same shape, batch,
sequence length, LoRA and checkpointing. Target: within 25% on every configuration.

Fairness: estimate and measurement are of the same configuration in the same run; the estimate is computed from
the saved config.json alone (as `plan` does), never from a measurement, and its coefficients are not fitted to
these runs. Every example is cut to exactly `--seq` tokens, so the batch the estimate assumes is the one trained.
The measurement is taken twice: with glibc's mmap threshold fixed at 64 KiB (freed tensors go back to the
system, so the peak resident size is the peak of live memory, as `torch.cuda.max_memory_allocated` is on a GPU)
and with glibc's default heap (which keeps freed blocks: what a CPU pod really peaks at); the target is on the
first, the second is reported beside it.

    .venv/bin/python benchmarks/teacher_memory.py [--steps 3] [--batch 8] [--seq 256]

Writes `benchmarks/records/teacher_memory.json`.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

from kubedistill import benchrecord
from kubedistill.core import memory
from kubedistill.core.spec import LoraSpec, Resources, TrainSpec
from kubedistill.core.storage import Storage
from kubedistill.ml import raytrain
from kubedistill.runner import local_ray
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm, train

LABELS = ["irrelevant", "partial", "relevant"]
SHAPE = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_position_embeddings": 1024}

#: (name, task, strategy, LoRA rank, gradient checkpointing)
CONFIGS = [
    ("SFT, ddp", "lm", "ddp", None, False),
    ("SFT, fsdp", "lm", "fsdp", None, False),
    ("SFT, fsdp + checkpointing", "lm", "fsdp", None, True),
    ("SFT, ddp + LoRA r=8", "lm", "ddp", 8, False),
    ("reward model, ddp", "reward", "ddp", None, False),
    ("DPO, fsdp", "dpo", "fsdp", None, False),
]


def model_dir(tmp: Path, texts: list[str]) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = lm.train_tokenizer(texts, 8000)
    config = LlamaConfig(**SHAPE, vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm.save(LlamaForCausalLM(config), tok, Storage(str(tmp / "start")))
    return tmp / "start"


def run(tmp: Path, start: Path, task: str, strategy: str, lora: int | None, ckpt: bool, args: argparse.Namespace,
        name: str) -> int:
    """The largest peak resident memory of the 2 workers of one training run, over what each held at its start."""
    cfg = train.TrainConfig(
        task=task, start=str(start), examples_uri=str(tmp / f"examples-{task}"),
        train=TrainSpec(epochs=1, learning_rate=1e-4, batch_size=args.batch, max_steps=args.steps),
        max_length=args.seq, dimensions=("label",), lora=LoraSpec(r=lora, alpha=2 * lora, dropout=0.0) if lora else None,
        strategy=strategy, gradient_checkpointing=ckpt, checkpoint_every=args.steps,
        precision="fp32")  # the planner estimates CPU workers in fp32 (kubedistill.core.memory)
    result = raytrain.fit(train.train_loop_per_worker, {"train": cfg}, Resources(workers=2, cpus_per_worker=1),
                          Storage(str(tmp / "ray")), name.replace(" ", "").replace(",", "-").replace("+", "")
                          .replace("=", ""), max_failures=0)
    return int(result.metrics["peak_rss_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences or pairs)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per example (every example is this long)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kd-teacher-memory-"))
    g = data.generate(LABELS, 200, 60, 4, 200, 10, seed=0)
    rng = random.Random(0)
    words = [w for r in g.corpus for w in r["text"].split()]
    long = lambda: " ".join(rng.choice(words) for _ in range(args.seq * 2))  # noqa: E731 - longer than seq: cut
    start = model_dir(tmp, [r["text"] for r in g.corpus])
    shape, why = memory.read_shape(str(start))
    assert shape is not None, why
    rows = {
        "lm": [{"prompt": fmt.prompt(r)[:40], "response": long()} for r in g.sft[:64]],
        "reward": [{"prompt": "q", "chosen": long(), "rejected": long(), "dimension": "label"} for _ in range(64)],
        "dpo": [{"prompt": "q", "chosen": long(), "rejected": long()} for _ in range(64)],
    }
    for task, r in rows.items():
        data.write_rows(Storage(str(tmp / f"examples-{task}")), "part-00000", r, "jsonl")
    results: dict[str, dict[str, float]] = {}
    for allocator in ("exact", "default"):
        # exact: glibc serves every block over 64 KiB with mmap and returns it on free, so the peak resident size
        # is the peak of live memory (what `torch.cuda.max_memory_allocated` is on a GPU); default: glibc's own
        # heap, which keeps freed blocks and fragments (what a CPU worker pod really peaks at)
        if allocator == "exact":
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        else:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        with local_ray(num_cpus=2):  # a fresh Ray: its workers inherit the allocator setting
            for name, task, strategy, lora, ckpt in CONFIGS:
                measured = run(tmp, start, task, strategy, lora, ckpt, args, f"{allocator}-{len(results)}-{name}")
                if allocator == "default":
                    results[name]["measured_default_heap_mib"] = measured / 2**20
                    print(f"{name:<28} glibc's default heap: measured {measured / 2**20:7.0f} MiB", flush=True)
                    continue
                job = memory.Job(task, 2, args.batch, args.seq, lora, ckpt, gpu=False)
                est = memory.estimate(shape, job, strategy)
                results[name] = {"estimate_mib": est.peak(False) / 2**20, "measured_mib": measured / 2**20,
                                 "ratio": est.peak(False) / measured,
                                 **{f"term_{k}_mib": v / 2**20 for k, v in est.terms.items()},
                                 "host_load_mib": est.host_load / 2**20}
                print(f"{name:<28} estimate {est.peak(False) / 2**20:7.0f} MiB  measured {measured / 2**20:7.0f} MiB  "
                      f"ratio {est.peak(False) / measured:.2f}  ({memory.breakdown(est)})", flush=True)
    worst = max(results.values(), key=lambda v: abs(v["ratio"] - 1))["ratio"]
    heap = [v["measured_default_heap_mib"] / v["measured_mib"] - 1 for v in results.values()]
    params = shape.params()
    print(f"model: scratch Llama {params / 1e6:.1f} M parameters; 2 CPU workers; batch {args.batch}, {args.seq} tokens")
    print(f"worst estimate/measured: {worst:.2f}")
    row: benchrecord.Row = {
        "what": f"teacher memory plan vs measured peak per worker, {len(CONFIGS)} configurations (ddp/fsdp, LoRA, "
                f"checkpointing, SFT/reward/DPO), {params / 1e6:.0f} M-parameter Llama on CPU (`teacher_memory.py`)",
        "target": "estimate within 25% of the measured peak",
        "measured": f"estimate/measured {min(v['ratio'] for v in results.values()):.2f}-"
                    f"{max(v['ratio'] for v in results.values()):.2f}; glibc's default heap peaks "
                    f"{min(heap):+.0%} to {max(heap):+.0%} over live memory",
        "met": "yes" if all(abs(v["ratio"] - 1) <= 0.25 for v in results.values()) else "no",
    }
    benchrecord.write("teacher_memory", vars(args), {"parameters": params, "configurations": results}, [row])


if __name__ == "__main__":
    main()
