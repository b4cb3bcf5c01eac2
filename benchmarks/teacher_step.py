"""Teacher training throughput: samples/s of the SFT step with 1 vs 2 Ray Train workers (DDP), one run.

The same scratch Llama, tokenizer, SFT examples and global batch for both; each configuration runs
`--steps` steps through `kubedistill.stages.teacher.train` (the stages' own loop) in a TorchTrainer, and
the loop's own clock (after model build and DDP set-up) gives samples/s. Configurations alternate
(1, 2, 1, 2, ...) for `--reps` repetitions; medians.

    .venv/bin/python benchmarks/teacher_step.py [--preset llama-tiny] [--batch 16] [--steps 30] [--reps 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kubedistill.core.spec import TrainSpec
from kubedistill.core.storage import Storage
from kubedistill.runner import local_ray
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm, train

LABELS = ["irrelevant", "partial", "relevant"]


def throughput(cfg: train.TrainConfig, workers: int, storage: str) -> float:
    trainer = TorchTrainer(train.train_loop_per_worker, train_loop_config={"train": cfg},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=storage))
    result = trainer.fit()
    if result.error:
        raise result.error
    return float(result.metrics["samples_per_second"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-tiny", choices=sorted(lm.SCRATCH))
    ap.add_argument("--batch", type=int, default=16, help="global batch (split across the workers)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    g = data.generate(LABELS, 300, 100, 4, 300, 10, seed=0)
    examples = [{"prompt": fmt.prompt(r), "response": fmt.response(r["reasoning"], r["label"])} for r in g.sft]
    tmp = Path(tempfile.mkdtemp(prefix="kd-teacher-step-"))
    model, tok = lm.scratch(f"scratch:{args.preset}", [r["text"] for r in g.corpus] + [e["prompt"] + e["response"] for e in examples])
    lm.save(model, tok, Storage(str(tmp / "model")))
    data.write_rows(Storage(str(tmp / "examples")), "part-00000", examples, "jsonl")
    cfg = train.TrainConfig(task="lm", start=str(tmp / "model"), examples_uri=str(tmp / "examples"), train=TrainSpec(epochs=1, learning_rate=1e-3, batch_size=args.batch, max_steps=args.steps), checkpoint_every=args.steps)
    results: dict[int, list[float]] = {1: [], 2: []}
    with local_ray(num_cpus=2):
        for _ in range(args.reps):
            for workers in (1, 2):
                results[workers].append(throughput(cfg, workers, str(tmp / "ray")))
    one, two = statistics.median(results[1]), statistics.median(results[2])
    params = sum(p.numel() for p in model.parameters())
    print(f"model: scratch:{args.preset} ({params:,} parameters, vocabulary {len(tok)}), SFT examples, global batch {args.batch}, {args.steps} steps")
    print(f"1 worker : {one:7.1f} samples/s  (runs: {', '.join(f'{x:.1f}' for x in results[1])})")
    print(f"2 workers: {two:7.1f} samples/s  (runs: {', '.join(f'{x:.1f}' for x in results[2])})")
    print(f"ratio 2/1: {two / one:.2f}x")


if __name__ == "__main__":
    main()
