"""Training steps in bf16 autocast vs fp32 (`resources.precision`), the student's and the teacher's, in one run.

What `precision: auto` buys on a CPU with AVX-512 BF16 or AMX (it takes bf16 there) and what it costs: the seconds
of a training step at the quickstart's shapes, and how far the same training goes in each arithmetic.

- student: MiniLM's first 3 layers (`student.layers: 3`), batches of 16 of the knowledge world's pairs at 64 tokens
  (`maxLength`), CE and CRSD (the reasoning view adds 96 tokens, `maxReasoningTokens`), both CPU threads;
- teacher: the quickstart's `scratch:llama-tiny` at one Ray Train worker's share of an SFT step (8 sequences of
  256 tokens, one thread: each of the two workers has one CPU);
- the same training in both: the student from the same initial weights over the same `--train-steps` batches (CE,
  learning rate 2e-4), then its loss and macro-F1 on held-out pairs of other queries, in each arithmetic.

    .venv/bin/python benchmarks/train_precision.py [--reps 12] [--train-steps 150]

Fairness: one process; for the step times the same model, batches and optimizer for both arithmetics, steps
interleaved (fp32, bf16, fp32, ...) so drift in the machine's speed hits both alike, medians after two warm-up
rounds. Writes `benchmarks/records/train_precision.json`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from kubedistill import benchrecord
from kubedistill.core.memory import SCRATCH
from kubedistill.core.spec import StudentSpec
from kubedistill.ml import precision
from kubedistill.ml.metrics import classification_metrics
from kubedistill.stages import world
from kubedistill.stages.data import split_by_query
from kubedistill.stages.student import Encoded, StudentConfig, build_model, loss_terms, predict_proba

LABELS = ["irrelevant", "partial", "relevant"]
ARITHMETIC = ("fp32", "bf16")


def interleaved(step: dict[str, Callable[[int], None]], reps: int) -> dict[str, float]:
    """Median seconds of each variant's step, the variants taking turns; two warm-up rounds."""
    times: dict[str, list[float]] = {v: [] for v in step}
    for rep in range(reps + 2):
        for v, fn in step.items():
            t0 = time.perf_counter()
            fn(rep)
            if rep >= 2:
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def student_steps(rows: list[dict], batch: int, reps: int) -> dict[str, float]:
    spec = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "layers": 3, "max_length": 64,
            "max_reasoning_tokens": 96}
    cfgs = {o: StudentConfig(StudentSpec.model_validate({**spec, "objective": o}), LABELS) for o in ("ce", "crsd")}
    torch.manual_seed(0)
    model, tok = build_model(cfgs["ce"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    enc = {o: Encoded(tok, rows, c, with_reasoning=o == "crsd") for o, c in cfgs.items()}

    def step(objective: str, arithmetic: str):
        def run(rep: int) -> None:
            idx = torch.arange(rep * batch, (rep + 1) * batch) % len(rows)
            loss = loss_terms(model, enc[objective], idx, cfgs[objective], arithmetic)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    return interleaved({f"student-{o}-{a}": step(o, a) for o in cfgs for a in ARITHMETIC}, reps)


def teacher_steps(reps: int) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SCRATCH["llama-tiny"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, SCRATCH["llama-tiny"]["vocab_size"], (8, 256))

    def step(arithmetic: str):
        def run(rep: int) -> None:
            with precision.autocast(arithmetic, "cpu"):
                loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one Ray Train worker of the quickstart's two, one CPU each
    try:
        return interleaved({f"teacher-{a}": step(a) for a in ARITHMETIC}, reps)
    finally:
        torch.set_num_threads(threads)


def same_training(train: list[dict], held: list[dict], steps: int, batch: int) -> dict[str, dict[str, float]]:
    """The student trained from the same weights over the same batches in each arithmetic; scored in fp32."""
    cfg = StudentConfig(StudentSpec.model_validate({
        "base_model": "sentence-transformers/all-MiniLM-L6-v2", "layers": 3, "max_length": 64, "objective": "ce"}),
        LABELS)
    torch.manual_seed(0)
    start, tok = build_model(cfg)
    enc = Encoded(tok, train, cfg, with_reasoning=False)
    out = {}
    for arithmetic in ARITHMETIC:
        model = copy.deepcopy(start)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)  # the same dropout masks
        model.train()
        losses = []
        for s in range(steps):
            idx = order[torch.arange(s * batch, (s + 1) * batch) % len(order)]
            loss = loss_terms(model, enc, idx, cfg, arithmetic)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        proba = predict_proba(model, tok, held, cfg.student.max_length)
        m = classification_metrics([r["label"] for r in held], proba, LABELS)
        out[arithmetic] = {"last_20_steps_loss": statistics.mean(losses[-20:]), "macro_f1": m["macro_f1"],
                           "accuracy": m["accuracy"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=150)
    args = ap.parse_args()
    native = precision.native_bf16("cpu")
    g = world.generate(LABELS, 300, 400, 6, 1, 10, seed=0)
    train, held = split_by_query(g.labeled, 0.2, seed=0)
    med = {**student_steps(train, args.batch, args.reps), **teacher_steps(args.reps)}
    trained = same_training(train, held, args.train_steps, args.batch)
    print(f"CPU computes bf16 natively: {native}; torch threads {torch.get_num_threads()}")
    rows: list[benchrecord.Row] = []
    for part, what in (("student-ce", "student CE step, MiniLM 3 layers, 16 pairs x 64 tokens"),
                       ("student-crsd", "student CRSD step (+96 reasoning tokens), MiniLM 3 layers, 16 pairs"),
                       ("teacher", "teacher SFT step on one worker (1 thread), llama-tiny, 8 x 256 tokens")):
        fp32, bf16 = med[f"{part}-fp32"], med[f"{part}-bf16"]
        print(f"{part:<13} fp32 {fp32 * 1000:7.1f} ms   bf16 {bf16 * 1000:7.1f} ms   bf16/fp32 {bf16 / fp32:.2f}x")
        rows.append({
            "what": f"{what}: bf16 autocast vs fp32 (`train_precision.py`)",
            "target": "bf16 <= 0.7x fp32 where the CPU computes bf16 natively (what `precision: auto` takes)",
            "measured": f"{bf16 / fp32:.2f}x ({bf16 * 1000:.0f} vs {fp32 * 1000:.0f} ms, medians of {args.reps}); "
                        f"native bf16: {'yes' if native else 'no'}",
            "met": ("yes" if bf16 / fp32 <= 0.7 else "no") if native else "- (no native bf16 here)",
        })
    f32, b16 = trained["fp32"], trained["bf16"]
    print(f"same {args.train_steps} steps: loss fp32 {f32['last_20_steps_loss']:.4f} bf16 {b16['last_20_steps_loss']:.4f}; "
          f"held-out macro-F1 fp32 {f32['macro_f1']:.4f} bf16 {b16['macro_f1']:.4f}")
    rows.append({
        "what": f"the student (CE) trained {args.train_steps} steps from the same weights on the same batches, "
                f"bf16 vs fp32, macro-F1 on {len(held)} held-out pairs of other queries (`train_precision.py`)",
        "target": "within 2 points of fp32 (one run: a check, not a measurement of spread)",
        "measured": f"bf16 {b16['macro_f1']:.3f} vs fp32 {f32['macro_f1']:.3f} "
                    f"({(b16['macro_f1'] - f32['macro_f1']) * 100:+.1f} points); training loss (last 20 steps) "
                    f"{b16['last_20_steps_loss']:.3f} vs {f32['last_20_steps_loss']:.3f}",
        "met": "yes" if abs(b16["macro_f1"] - f32["macro_f1"]) <= 0.02 else "no",
    })
    benchrecord.write("train_precision", vars(args),
                      {"native_bf16": native, "median_seconds": med, "same_training": trained}, rows)


if __name__ == "__main__":
    main()
