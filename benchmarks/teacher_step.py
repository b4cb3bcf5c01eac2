"""Teacher training throughput: samples/s of the SFT step with 2 Ray Train workers (DDP) vs 1, one run.

Fairness: both configurations get the same cores. The baseline is 1 worker with `--cpus` CPUs (so Ray gives
it that many torch threads), the candidate `--cpus` workers with 1 CPU each (one thread each): the ratio
measures data parallelism against intra-op threading on the same cores, not cores against cores. Both
train the same scratch Llama from the same saved weights on the same SFT examples with the same global
batch and steps. Checked at run time: each configuration's worker reports its torch threads and
threads x workers must equal `--cpus`. Each configuration runs `--steps` steps through
`kubedistill.stages.teacher.train` (the stages' own loop) in a TorchTrainer; samples/s is the loop's own
clock (after model build and DDP set-up). Configurations alternate for `--reps` repetitions; medians.

    .venv/bin/python benchmarks/teacher_step.py [--preset llama-tiny] [--batch 16] [--steps 30] [--reps 2]

Writes `benchmarks/records/teacher_step-<preset>.json`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kubedistill import benchrecord
from kubedistill.core.spec import TrainSpec
from kubedistill.core.storage import Storage
from kubedistill.runner import local_ray
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm, train

LABELS = ["irrelevant", "partial", "relevant"]


def sft_run(tmp: Path, preset: str, batch: int, steps: int) -> tuple[train.TrainConfig, Any, Any]:
    """A scratch teacher saved under `tmp` and the SFT training config of `steps` steps of `batch` on synthetic
    SFT examples (also saved there): (config, model, tokenizer). `train_startup.py` uses it too."""
    g = data.generate(LABELS, 300, 100, 4, 300, 10, seed=0)
    examples = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in g.sft]
    model, tok = lm.scratch(f"scratch:{preset}", [r["text"] for r in g.corpus] + [e["prompt"] + e["response"] for e in examples])
    lm.save(model, tok, Storage(str(tmp / "model")))
    data.write_rows(Storage(str(tmp / "examples")), "part-00000", examples, "jsonl")
    cfg = train.TrainConfig(task="lm", start=str(tmp / "model"), examples_uri=str(tmp / "examples"), train=TrainSpec(epochs=1, learning_rate=1e-3, batch_size=batch, max_steps=steps), checkpoint_every=steps)
    return cfg, model, tok


def throughput(cfg: train.TrainConfig, workers: int, cpus_per_worker: int, storage: str) -> tuple[float, int]:
    """(samples/s, the worker's torch threads) of one training run."""
    trainer = TorchTrainer(train.train_loop_per_worker, train_loop_config={"train": cfg},
                           scaling_config=ScalingConfig(num_workers=workers,
                                                        resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=RunConfig(storage_path=storage))
    result = trainer.fit()
    if result.error:
        raise result.error
    return float(result.metrics["samples_per_second"]), int(result.metrics["torch_threads"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-tiny", choices=sorted(lm.SCRATCH))
    ap.add_argument("--batch", type=int, default=16, help="global batch (split across the workers)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="cores for each configuration")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kd-teacher-step-"))
    cfg, model, tok = sft_run(tmp, args.preset, args.batch, args.steps)
    shapes = {"1 worker x %d CPUs" % args.cpus: (1, args.cpus), "%d workers x 1 CPU" % args.cpus: (args.cpus, 1)}
    runs: dict[str, list[float]] = {name: [] for name in shapes}
    threads: dict[str, int] = {}
    with local_ray(num_cpus=args.cpus):
        for _ in range(args.reps):
            for name, (workers, cpus) in shapes.items():
                rate, threads[name] = throughput(cfg, workers, cpus, str(tmp / "ray"))
                if threads[name] * workers != args.cpus:
                    raise SystemExit(f"unfair: {name} computed with {threads[name]} torch threads per worker")
                runs[name].append(rate)
    (base, one), (cand, two) = ((n, statistics.median(v)) for n, v in runs.items())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: scratch:{args.preset} ({params:,} parameters, vocabulary {len(tok)}), SFT examples, "
          f"global batch {args.batch}, {args.steps} steps, {args.cpus} cores for each configuration")
    for name, v in runs.items():
        print(f"{name:<20}: {statistics.median(v):7.1f} samples/s  (torch threads per worker {threads[name]}; "
              f"runs: {', '.join(f'{x:.1f}' for x in v)})")
    ratio = two / one
    print(f"ratio {cand} / {base}: {ratio:.2f}x")
    row: benchrecord.Row = {
        "what": f"teacher SFT step, {cand} (DDP) vs {base}, scratch:{args.preset} ({params / 1e6:.2f} M parameters), "
                f"same cores (`teacher_step.py`)",
        "target": "DDP faster on the same cores",
        "measured": f"{ratio:.2f}x ({two:.1f} vs {one:.1f} samples/s, medians of {args.reps})",
        "met": "yes" if ratio > 1.0 else "no",
    }
    benchrecord.write("teacher_step", vars(args),
                      {"parameters": params, "samples_per_s": runs, "threads_per_worker": threads,
                       "median": {base: one, cand: two}, "ratio": ratio}, [row], tag=args.preset)


if __name__ == "__main__":
    main()
