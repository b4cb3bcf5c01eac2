"""Pruning search: predictor-guided vs random search with the same number of real evaluations, 3 seeds.

Model: `tests/teacher_model.py`'s scratch Llama trained on the teacher's format (what the quickstart's
teacher is, trained a little longer). Both searches draw architectures that remove `--target` of the
parameters (at least, at most 1 point more); every real evaluation prunes the model with the same
Taylor importance (`--calibration` SFT texts) and measures perplexity on `--texts` held-out eval
texts. Per seed:
  guided: `--sampled` random architectures evaluated, a GBDT fitted on them, the space narrowed,
          `--top-k` predictor picks (of `--candidates`) evaluated: sampled + top-k real evaluations;
  random: the same number of random architectures evaluated.
The best perplexity each found, and the uniform baseline (one ratio everywhere, same budget).

    .venv/bin/python benchmarks/prune_search.py [--target 0.25] [--sampled 24] [--top-k 6] [--seeds 0 1 2]

Fairness: both searches get the same number of real evaluations, on the same model, importance scores and
held-out texts, and draw from the same constraint on the removed fraction. Writes
`benchmarks/records/prune_search.json`.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubedistill import benchrecord
from kubedistill.ml import prune
from kubedistill.stages import data
from kubedistill.stages import prune_search as ps
from kubedistill.stages.teacher import fmt, lm
from kubedistill.stages.teacher.train import encode
from tests import teacher_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--sampled", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--candidates", type=int, default=3000)
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kd-prune-bench-"))
    path = str(teacher_model.build(root / "teacher", steps=600))
    g = data.generate(teacher_model.LABELS, 200, 150, 4, 200, 300, seed=21)  # held out from the teacher's data

    def text(r: dict) -> str:
        return fmt.prompt(r) + fmt.response(r["reasoning"], r["label"])

    evald = ps.EvalData([text(r) for r in g.eval[: args.texts]], [], teacher_model.LABELS, gen_tokens=0)
    model, tok = lm.load(path, "model")
    calib = [text(r) for r in g.sft[: args.calibration]]
    imp = prune.taylor_importance(model, [encode(tok, [""] * 8, calib[i: i + 8], 256) for i in range(0, len(calib), 8)])
    shape = prune.shape_of(model)
    base = ps.measure(model, tok, evald)["perplexity"]
    cache: dict[str, float] = {}

    def ppl(arch: prune.Architecture) -> float:
        key = ps.arch_key(arch)
        if key not in cache:
            cache[key] = ps.evaluate(path, imp, arch, evald)["perplexity"]
        return cache[key]

    uni = ps.uniform(shape, args.target)
    print(f"model: {shape.params():,} parameters, {shape.layers} layers; base perplexity {base:.3f}; "
          f"uniform at {shape.removed_fraction(uni):.4f} removed: {ppl(uni):.3f}", flush=True)
    budget = args.sampled + args.top_k
    rows = []
    for seed in args.seeds:
        rng = random.Random(seed)
        sampled = ps.sample_many(shape, args.target, args.sampled, rng)
        y = [ppl(a) for a in sampled]
        pred = ps.fit_predictor(sampled, [math.log(v) for v in y], seed)
        bounds = ps.narrow(shape, pred, args.target, rng, candidates=max(200, args.candidates // 4))
        top = ps.propose(shape, pred, args.target, bounds, args.candidates, args.top_k, rng, exclude=set(sampled))
        guided = min(y + [ppl(a) for a in top])
        pool = ps.sample_many(shape, args.target, budget, random.Random(10_000 + seed))
        rand = min(ppl(a) for a in pool)
        rows.append((seed, guided, rand, pred.diagnostics["r2"], pred.diagnostics["kendall_tau"]))
        print(f"seed {seed}: guided best {guided:.3f} (of {len(sampled)}+{len(top)}), random best {rand:.3f} "
              f"(of {len(pool)}); predictor R^2 {pred.diagnostics['r2']}, tau {pred.diagnostics['kendall_tau']}",
              flush=True)
    g_mean, r_mean = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
    print(f"mean best perplexity: guided {g_mean:.3f}, random {r_mean:.3f}; ratio guided/random {g_mean / r_mean:.4f}; "
          f"guided vs uniform {100 * (g_mean - ppl(uni)) / ppl(uni):+.2f}%, random vs uniform "
          f"{100 * (r_mean - ppl(uni)) / ppl(uni):+.2f}%; guided better on {sum(r[1] < r[2] for r in rows)}/{len(rows)} seeds")
    wins = sum(r[1] < r[2] for r in rows)
    row: benchrecord.Row = {
        "what": f"pruning search vs random, {budget} real evaluations each, {args.target:.0%} removed, "
                f"{len(rows)} seeds (`prune_search.py`)",
        "target": "guided better",
        "measured": f"best perplexity {g_mean:.2f} vs {r_mean:.2f} ({wins}/{len(rows)} seeds); "
                    f"{100 * (g_mean - ppl(uni)) / ppl(uni):+.1f}% vs uniform ({ppl(uni):.2f})",
        "met": "yes" if wins == len(rows) else f"no ({wins}/{len(rows)} seeds)",
    }
    benchrecord.write("prune_search", vars(args), {
        "parameters": shape.params(), "base_perplexity": base, "uniform_perplexity": ppl(uni),
        "seeds": [{"seed": r[0], "guided": r[1], "random": r[2], "predictor_r2": r[3], "kendall_tau": r[4]} for r in rows],
        "mean": {"guided": g_mean, "random": r_mean}}, [row])


if __name__ == "__main__":
    main()
