"""Training-step time of the `crsd` objective vs `ce`, same model, data and batch, in one run.

CRSD encodes each pair twice (standard + reasoning-augmented input), so it costs more per step;
the target is <= 2.3x. Steps are interleaved (ce, crsd, ce, ...) and the median of each is taken.

    .venv/bin/python benchmarks/crsd_step.py [--batch 32] [--reps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from kubedistill import data
from kubedistill.student import Encoded, StudentConfig, build_model, loss_terms

LABELS = ["irrelevant", "partial", "relevant"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    rows = data.generate(LABELS, 300, 100, 6, 1, 10, seed=0).labeled
    base = StudentConfig(labels=LABELS, base_model="sentence-transformers/all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model, tok = build_model(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    enc = {o: Encoded(tok, rows, replace(base, objective=o), with_reasoning=o == "crsd") for o in ("ce", "crsd")}
    times: dict[str, list[float]] = {"ce": [], "crsd": []}
    model.train()
    for rep in range(args.reps + 2):
        idx = torch.arange(rep * args.batch, (rep + 1) * args.batch) % len(rows)
        for objective in ("ce", "crsd"):
            t0 = time.perf_counter()
            terms = loss_terms(model, enc[objective], idx, replace(base, objective=objective))
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            if rep >= 2:  # two warm-up rounds
                times[objective].append(time.perf_counter() - t0)
    ce, crsd = statistics.median(times["ce"]), statistics.median(times["crsd"])
    tokens = {o: int(enc[o].standard["attention_mask"].sum()) + (int(enc[o].reasoning["attention_mask"].sum()) if enc[o].reasoning is not None else 0) for o in enc}
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.reps} interleaved steps each")
    print(f"ce   step median {ce * 1000:8.1f} ms   ({tokens['ce'] / len(rows):.1f} tokens/pair)")
    print(f"crsd step median {crsd * 1000:8.1f} ms   ({tokens['crsd'] / len(rows):.1f} tokens/pair, both views)")
    print(f"ratio crsd/ce = {crsd / ce:.2f}x   (target <= 2.3x)")


if __name__ == "__main__":
    main()
