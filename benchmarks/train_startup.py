"""What a short training run costs besides its steps: Ray Train's controller polling every 2 s (its default)
vs every 0.25 s (what a local head sets, `kubedistill.runner._LOCAL_HEAD_ENV`), one run.

Ray Train's controller moves a run from one state to the next (worker group started, training, finished)
only when it polls the workers, every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` seconds, so each run waits for
polls at its start and end. A quickstart has 8 training runs (4 teacher stages, the student's 2
objectives, the pruned and the uniform model's recovery), each of a few seconds to a few minutes of steps.

Each run is the teacher stages' own loop (`kubedistill.stages.teacher.train`) on the quickstart's teacher
shape (`scratch:llama-tiny`), `--steps` SFT steps on 2 workers x 1 CPU (DDP), in a TorchTrainer on a local
Ray started as `kubedistill run` starts it. Measured: the wall time of `trainer.fit()` (what a stage waits
for), and the loop's own seconds per step (the polling must not slow the steps). Fairness: the interval is
the only difference (set in the driver's environment, which Ray Train passes to its controller); the two
settings alternate for `--reps` repetitions after one untimed warm-up run; medians.

    .venv/bin/python benchmarks/train_startup.py [--steps 20] [--reps 4]

Writes `benchmarks/records/train_startup.json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kubedistill import benchrecord
from kubedistill.runner import _LOCAL_HEAD_ENV, local_ray
from kubedistill.stages.teacher import train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # teacher_step
from teacher_step import sft_run

VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT = "2.0"  # Ray Train 2.60's DEFAULT_HEALTH_CHECK_INTERVAL_S


def one_run(cfg: train.TrainConfig, interval: str, storage: str) -> tuple[float, float]:
    """(wall seconds of fit(), the loop's seconds per step) of one training run under `interval`."""
    os.environ[VAR] = interval
    trainer = TorchTrainer(
        train.train_loop_per_worker,
        train_loop_config={"train": cfg},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage),
    )
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    if result.error:
        raise result.error
    return wall, float(result.metrics["seconds_per_step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    ours = _LOCAL_HEAD_ENV[VAR]

    tmp = Path(tempfile.mkdtemp(prefix="kd-train-startup-"))
    cfg, _, _ = sft_run(tmp, "llama-tiny", 16, args.steps)
    walls: dict[str, list[float]] = {DEFAULT: [], ours: []}
    steps: dict[str, list[float]] = {DEFAULT: [], ours: []}
    with local_ray(num_cpus=2):
        one_run(cfg, ours, str(tmp / "ray"))  # warm-up: the first run also pays for first imports
        for _ in range(args.reps):
            for interval in (DEFAULT, ours):
                wall, per_step = one_run(cfg, interval, str(tmp / "ray"))
                walls[interval].append(wall)
                steps[interval].append(per_step)
    base, cand = statistics.median(walls[DEFAULT]), statistics.median(walls[ours])
    print(f"scratch:llama-tiny, {args.steps} SFT steps of 16 on 2 workers x 1 CPU, {args.reps} runs each")
    for interval in (DEFAULT, ours):
        print(
            f"poll every {interval:>4} s: fit() {statistics.median(walls[interval]):5.1f} s "
            f"(runs: {', '.join(f'{x:.1f}' for x in walls[interval])}); "
            f"{statistics.median(steps[interval]):.4f} s/step"
        )
    saved = base - cand
    print(f"saved per training run: {saved:.1f} s; ratio {base / cand:.2f}x")
    step_ratio = statistics.median(steps[ours]) / statistics.median(steps[DEFAULT])
    rows: list[benchrecord.Row] = [
        {
            "what": f"wall time of a {args.steps}-step training run (Ray Train fit), controller polling every {ours} s "
            f"vs Ray's {DEFAULT} s (`train_startup.py`)",
            "target": "shorter",
            "measured": f"{cand:.1f} vs {base:.1f} s ({saved:.1f} s saved per run, medians of {args.reps})",
            "met": "yes" if cand < base else "no",
        },
        {
            "what": f"seconds per training step, polling every {ours} s vs {DEFAULT} s (`train_startup.py`)",
            "target": "no slower (<= 1.05x)",
            "measured": f"{step_ratio:.2f}x",
            "met": "yes" if step_ratio <= 1.05 else "no",
        },
    ]
    benchrecord.write(
        "train_startup",
        vars(args),
        {
            "interval_ours": ours,
            "interval_default": DEFAULT,
            "fit_seconds": walls,
            "seconds_per_step": steps,
            "median_fit_seconds": {DEFAULT: base, ours: cand},
            "saved_per_run_seconds": saved,
        },
        rows,
    )


if __name__ == "__main__":
    main()
