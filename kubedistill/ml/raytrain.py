"""The Ray Train plumbing the teacher and the student share.

Driver side: `fit` runs a training loop as a TorchTrainer sized by a stage's `resources`, with its
checkpoints under the stage's prefix (`<stage>/ray/<name>`): a job rerun under the same name resumes
from the latest one, and Ray Train recovers from `max_failures` worker failures by checkpoint.
Worker side: `resume_state` is the latest checkpoint's state (None on a fresh start), and `report`
hands metrics to Ray Train with a checkpoint written by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from kubedistill.core.holds import hold
from kubedistill.core.progress import Steps, Target
from kubedistill.core.spec import Resources
from kubedistill.core.storage import Storage

STATE_FILE = "state.pt"


def fit(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    resources: Resources,
    out: Storage,
    name: str,
    max_failures: int,
    progress: Target | None = None,
) -> Any:
    """Run `loop` on `resources.workers` Ray Train workers; the `ray.train.Result` (its error raised). The
    loop finds `progress` under `loop_config["progress"]` (`steps` makes its `on_step` of it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = resources.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            # the same name and storage path on a retried job resumes from the latest checkpoint
            name=name,
            storage_path=out.path("ray"),
            storage_filesystem=out.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def steps(config: dict[str, Any], label: str | None = None) -> Steps:
    """In a worker: the loop's `on_step`, publishing progress from rank 0 only (close it when the loop ends)."""
    import ray.train

    return Steps(config.get("progress"), ray.train.get_context().get_world_rank() == 0, label=label)


def scalar_metrics(result: Any) -> dict[str, Any]:
    """The numbers, flags and words (the strategy, the arithmetic) of a Result's last report."""
    return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, bool, str))}


def load_tensors(source: Any) -> Any:
    """A `torch.save` file (path or file object) read with `weights_only=True`: tensors, numbers, strings and
    containers of them, never a pickled object. Anyone who can write a run's prefix could otherwise plant a
    file that runs code in the stage pods when loaded; such a file is refused (`pickle.UnpicklingError`)."""
    return torch.load(source, weights_only=True, map_location="cpu")


def load_state(checkpoint: Any) -> dict[str, Any]:
    """The training state a (ddp) checkpoint holds (read where the model is needed next)."""
    with checkpoint.as_directory() as d:
        return load_tensors(Path(d) / STATE_FILE)


def resume_state(label: str) -> dict[str, Any] | None:
    """In a worker: the latest checkpoint's state, or None on a fresh start (rank 0 says which step)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    state = load_state(ckpt)
    if ray.train.get_context().get_world_rank() == 0:
        print(f"[{label}] resuming from checkpoint at step {state['step']}", flush=True)
    return state


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """In a worker: the latest checkpoint as a local directory (every shard of it), or None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def state_file(state: Callable[[], dict[str, Any]]) -> Callable[[Path], bool]:
    """A checkpoint writer for `report`: rank 0 saves `state()` as `state.pt`, the other ranks write nothing."""

    def save(d: Path) -> bool:
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return False
        torch.save(state(), d / STATE_FILE)
        return True

    return save


def report(metrics: dict[str, Any], save: Callable[[Path], bool], line: str) -> None:
    """In a worker: report `metrics` with a checkpoint of the files `save(dir)` writes on each rank (True: this
    rank wrote some; Ray Train gathers every rank's files into one checkpoint directory); rank 0 prints `line`."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = ray.train.Checkpoint.from_directory(d) if save(Path(d)) else None
        if rank == 0:
            print(line, flush=True)
        ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            hold("train.checkpoint-reported")


def rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process (Linux /proc; (0, 0) elsewhere)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0, 0
    kb = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
    return kb.get("VmRSS", 0) * 1024, kb.get("VmHWM", 0) * 1024


def max_over_workers(values: dict[str, int]) -> dict[str, int]:
    """In a worker: each value's maximum over the training workers (every worker calls it at the same point)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {k: int(v) for k, v in zip(values, t.tolist(), strict=True)}
