"""Training-step time of the `crsd` objective vs `ce`, same model, data and batch, in one run.

CRSD encodes each pair twice (standard + reasoning-augmented input), so a step costs more; the
target is <= 2.3x for the default configuration. Measured for both CRSD settings of
`spec.student.crsd.teacherGrad`: crsd (false, the default: the reasoning view is encoded
forward-only) and crsd-full (true: it backpropagates into the encoder). Steps are interleaved
(ce, crsd, crsd-full, ce, ...); medians.

    .venv/bin/python benchmarks/crsd_step.py [--batch 32] [--reps 8] [--max-length 64]

Fairness: one process, one model and optimizer, the same rows and batch indices for every variant, steps
interleaved so drift in the machine's speed hits all alike; writes `benchmarks/records/crsd_step.json`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kubedistill import benchrecord
from kubedistill.core.spec import CrsdSpec, StudentSpec
from kubedistill.stages import data
from kubedistill.stages.student import Encoded, StudentConfig, build_model, loss_terms

LABELS = ["irrelevant", "partial", "relevant"]
VARIANTS = {"ce": {"objective": "ce"}, "crsd": {"objective": "crsd", "crsd": {"teacher_grad": False}},
            "crsd-full": {"objective": "crsd", "crsd": {"teacher_grad": True}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-reasoning-tokens", type=int, default=64)
    args = ap.parse_args()
    rows = data.generate(LABELS, 300, 100, 6, 1, 10, seed=0).labeled
    student = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "max_length": args.max_length,
               "max_reasoning_tokens": args.max_reasoning_tokens}
    base = StudentConfig(StudentSpec.model_validate(student), LABELS)
    torch.manual_seed(0)
    model, tok = build_model(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cfgs = {v: StudentConfig(StudentSpec.model_validate({**student, **kw}), LABELS) for v, kw in VARIANTS.items()}
    enc = {v: Encoded(tok, rows, c, with_reasoning=c.student.objective == "crsd") for v, c in cfgs.items()}
    times: dict[str, list[float]] = {v: [] for v in cfgs}
    model.train()
    for rep in range(args.reps + 2):
        idx = torch.arange(rep * args.batch, (rep + 1) * args.batch) % len(rows)
        for v, cfg in cfgs.items():
            t0 = time.perf_counter()
            terms = loss_terms(model, enc[v], idx, cfg)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            if rep >= 2:  # two warm-up rounds
                times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    n_std = int(enc["ce"].standard["attention_mask"].sum()) / len(rows)
    n_rsn = int(enc["crsd"].reasoning["attention_mask"].sum()) / len(rows)
    default = "crsd-full" if CrsdSpec().teacher_grad else "crsd"
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, max length {args.max_length} "
          f"(+{args.max_reasoning_tokens} reasoning), {args.reps} interleaved steps each")
    print(f"tokens per pair: standard {n_std:.1f}, reasoning view {n_rsn:.1f}")
    for v in cfgs:
        print(f"{v:<10} step median {med[v] * 1000:8.1f} ms   ratio to ce {med[v] / med['ce']:.2f}x")
    ratio = med[default] / med["ce"]
    print(f"default ({default}) crsd/ce = {ratio:.2f}x   (target <= 2.3x)")
    others = ", ".join(f"{v} {med[v] / med['ce']:.2f}x" for v in cfgs if v not in ("ce", default))
    row: benchrecord.Row = {
        "what": "CRSD training step vs CE, MiniLM-L6, batch %d (`crsd_step.py`)" % args.batch,
        "target": "<= 2.3x",
        "measured": f"{ratio:.2f}x ({med[default] * 1000:.0f} vs {med['ce'] * 1000:.0f} ms, medians of {args.reps}); {others}",
        "met": "yes" if ratio <= 2.3 else "no",
    }
    benchrecord.write("crsd_step", vars(args), {"step_seconds": times, "median_seconds": med,
                                                "tokens_per_pair": {"standard": n_std, "reasoning": n_rsn},
                                                "torch_threads": torch.get_num_threads()}, [row])


if __name__ == "__main__":
    main()
