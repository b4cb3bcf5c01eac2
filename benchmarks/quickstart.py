"""The quickstart, every stage: what `make demo` runs (`manifests/samples/quickstart.yaml`), timed, with its
student's quality and the gate's two verdicts, in one run.

The sample exactly as shipped, except its storage (a fresh directory, so every stage runs: nothing is
reused) and serving's port (a claimed free one; the served student is shut down when the run ends, where
`make demo` keeps it up). The environment's set-up (`make dev`) is not included. Wall time is the run's
own clock; per-stage seconds come from the stages' manifests. Fairness: the student's comparison is the evaluate
stage's own: the lexical baseline trained on the same rows, scored on the same eval pairs, with the
paired-bootstrap interval of the gain (resampling the eval set's queries).

    .venv/bin/python benchmarks/quickstart.py [--sample manifests/samples/quickstart.yaml] [--world classic|knowledge]

Writes `benchmarks/records/quickstart.json`.

`--world classic|knowledge` runs the same sample on that synthetic world (`spec.data.synthetic.world`, the same seed
and sizes) with the token budgets the world's text needs and nothing else changed (`WORLD_BUDGETS`). The sample is on
the classic world. On the knowledge world the teacher's chains run to about 131 tokens (the oracle's), so
`annotation.maxTokens: 160` and `teacher.maxNewTokens: 160` (96 cut 11.7% of them before their label line, RESULTS.md
"Students on a teacher's annotations"; the teacher's own stages generated at most 128 tokens before
`teacher.maxNewTokens` existed); its standard inputs run to 60 tokens, so `student.maxLength: 64` (48 cut 12.6% of
them); and the CRSD view keeps 96 reasoning tokens (the ablation's). The classic world's are 96, 48 and the spec's default 64. Writes
`quickstart-<world>.json`.

`--seed N` draws every trained or sampled part again with seed N (`teacher.seed`, `annotation.seed`,
`student.seed`, `pruning.seed`) on the same world (its data, log and held-out pairs unchanged): how far one
quickstart's numbers are from another draw of the same spec. Writes `quickstart[-<world>]-seed<N>.json` (N > 0).

`--validate-on trainingRows|sftSeed` sets `student.validateOn`, everything else the sample's. The sample validates
on sftSeed (held-out queries of the SFT set: true labels; the students train on every annotated pair) since
2026-12-07; trainingRows (held-out queries of the teacher-labeled log, the spec's default) is how it ran before, and
`quickstart[-<world>][-seed<N>].json` made then are its records. Writes
`quickstart[-<world>]-validate-<value, lower case>[-seed<N>].json`.

`--objective ce|kd|crsd`, `--compare [OBJECTIVE ...]` and `--votes N` set `student.objective`,
`student.compareObjectives` and `annotation.votes` (kd learns the shares of the teacher's labels over its annotation
and N sampled answers). The record's tag adds `<objective>[-vs-<compared>]` and `votes<N>` after the validation part.

`--precision auto|bf16|fp32` sets `resources.precision` of the teacher and the student (the sample's: auto, which
takes bf16 on a CPU with AVX-512 BF16 or AMX; records made before 2026-12-07 evening trained in fp32). The tag adds
`<precision>` before the seed.

`--log-queries N` sets `data.synthetic.queries` (the log's queries; the sample's 400 give 2,400 pairs to annotate) and
`--epochs E` the students' `student.train.epochs`: the same student budget spread over a larger log. The world's other
splits keep their sizes, but a query's split is a hash over every split's size, so the held-out pairs are another
draw of the same distribution. The tag adds `log<N>` and `epochs<E>` before the precision.

`--tag T` ends the record's tag with T (e.g. the machine, `quickstart-noavx512.json`), so a run of the sample on
another machine does not replace the record of this one.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kubedistill import benchrecord, runner
from kubedistill.core import spec
from kubedistill.core.ports import Ports
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage

ROOT = Path(__file__).resolve().parent.parent


class Tee(io.StringIO):
    def write(self, s: str) -> int:
        sys.stdout.write(s)
        return super().write(s)


#: per world, the token budgets its text needs (module docstring): annotation.maxTokens (and teacher.maxNewTokens),
#: student.maxLength and student.maxReasoningTokens
WORLD_BUDGETS: dict[str, tuple[int, int, int]] = {"classic": (96, 48, 64), "knowledge": (160, 64, 96)}


def on_world(spec_doc: dict, world: str) -> None:
    """The sample's spec on `world`, with the token budgets its text needs (`WORLD_BUDGETS`)."""
    spec_doc["data"]["synthetic"]["world"] = world
    max_tokens, max_length, reasoning = WORLD_BUDGETS[world]
    spec_doc["annotation"]["maxTokens"] = max_tokens
    spec_doc["teacher"]["maxNewTokens"] = max_tokens  # the teacher's own answers need what the annotator's do
    spec_doc["student"]["maxLength"] = max_length
    spec_doc["student"]["maxReasoningTokens"] = reasoning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", default=str(ROOT / "manifests/samples/quickstart.yaml"))
    ap.add_argument("--target-minutes", type=float, default=12.0)
    ap.add_argument("--target-gain", type=float, default=0.05, help="the served student over the lexical baseline")
    ap.add_argument("--world", choices=sorted(WORLD_BUDGETS), default=None,
                    help="run the sample on this synthetic world (default: the sample's own)")
    ap.add_argument("--seed", type=int, default=None,
                    help="teacher, annotation, student and pruning seed (the world's stays the sample's)")
    ap.add_argument("--validate-on", choices=["trainingRows", "sftSeed"], default=None,
                    help="spec.student.validateOn (default: the sample's)")
    ap.add_argument("--objective", choices=["ce", "kd", "crsd"], default=None,
                    help="spec.student.objective (default: the sample's)")
    ap.add_argument("--compare", nargs="*", choices=["ce", "kd", "crsd"], default=None,
                    help="spec.student.compareObjectives (default: the sample's)")
    ap.add_argument("--votes", type=int, default=None, help="spec.annotation.votes (default: the sample's)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                    help="teacher and student resources.precision (default: the sample's)")
    ap.add_argument("--log-queries", type=int, default=None, help="spec.data.synthetic.queries (default: the sample's)")
    ap.add_argument("--epochs", type=float, default=None, help="spec.student.train.epochs (default: the sample's)")
    ap.add_argument("--tag", default="", help="appended to the record's tag (e.g. the machine)")
    args = ap.parse_args()
    doc = yaml.safe_load(Path(args.sample).read_text())
    if args.seed is not None:
        for part in ("teacher", "annotation", "student", "pruning"):
            doc["spec"][part]["seed"] = args.seed
    if args.validate_on:
        doc["spec"]["student"]["validateOn"] = args.validate_on
    if args.objective:
        doc["spec"]["student"]["objective"] = args.objective
    if args.compare is not None:
        doc["spec"]["student"]["compareObjectives"] = args.compare
    if args.votes is not None:
        doc["spec"]["annotation"]["votes"] = args.votes
    if args.precision:
        for part in ("teacher", "student"):
            doc["spec"][part].setdefault("resources", {})["precision"] = args.precision
    if args.log_queries is not None:
        doc["spec"]["data"]["synthetic"]["queries"] = args.log_queries
    if args.epochs is not None:
        doc["spec"]["student"]["train"]["epochs"] = args.epochs
    if args.world:
        on_world(doc["spec"], args.world)
    store = tempfile.mkdtemp(prefix="kd-quickstart-bench-")
    doc["spec"]["storage"]["uri"] = store
    run = spec.parse_run(doc)
    t0 = time.monotonic()
    with Ports.claim(1) as port:
        status = runner.run_local(run, out=Tee(), serve_port=port[0])
    wall = time.monotonic() - t0
    st = Storage(f"{store}/{run.name}")
    phases = {s.name: s.phase for s in status.stages}
    seconds, stage_metrics = {}, {}
    for name in phases:
        m = st.read_json(f"{name}/{MANIFEST}") if st.exists(f"{name}/{MANIFEST}") else None
        if m:
            seconds[name] = m.get("seconds")
            stage_metrics[name] = m.get("metrics", {})
    ev = st.read_json(f"evaluate/{MANIFEST}")
    report = Storage(ev["artifact"]).read_json("metrics.json")
    models = {n: {"macro_f1": m["macro_f1"], "auc": m["auc_ovr"], "accuracy": m["accuracy"]} for n, m in report["models"].items()}
    gate = report["gate"]
    checks = {c["rule"]: c for c in gate.get("checks", [])}
    compare = checks.get("minGainOverBaseline")
    quality = f"student macro-F1 {models['student']['macro_f1']:.3f}" if "student" in models else "no student"
    if compare:
        quality += (f" vs lexical {compare['baseline_macro_f1']:.3f} (gain {compare['value']:+.3f}, 90% interval "
                    f"[{compare['interval'][0]:+.3f}, {compare['interval'][1]:+.3f}])")
    verdicts = ", ".join(f"{rule} {c['threshold']} {'passed' if c['passed'] else 'failed'}" for rule, c in checks.items())
    served = phases.get("serve") == "Succeeded"
    minutes, secs = divmod(round(wall), 60)
    flags = {"world": args.world, "validate-on": args.validate_on, "objective": args.objective,
             "compare": " ".join(args.compare) if args.compare is not None else None, "votes": args.votes,
             "log-queries": args.log_queries, "epochs": args.epochs, "precision": args.precision, "seed": args.seed,
             "tag": args.tag}
    how = "quickstart.py" + "".join(f" --{flag} {value}" for flag, value in flags.items() if value)
    row: benchrecord.Row = {
        "what": f"quickstart, every stage (`{how}`: the sample `make demo` runs, fresh storage, set-up excluded)",
        "target": f"<= {args.target_minutes:.0f} min on 2 cores",
        "measured": f"{minutes} min {secs} s, {status.phase}; {quality}; gate: {verdicts}; "
                    f"{'served' if served else 'not served'}",
        "met": ("yes" if wall <= args.target_minutes * 60 and status.phase == "Succeeded" else "no") + " (time)"
               + ("" if gate["passed"] else "; the student does not pass its gate"),
    }
    rows = [row]
    if compare:  # issue 20: the quickstart shows the value
        over = f" over {compare['resampled']}" if compare.get("resampled") else ""
        rows.append({
            "what": "quickstart's served student vs the lexical baseline taught by the same rows, macro-F1 on the "
                    f"{report['eval_rows']:,} held-out pairs (`{how}`)",
            "target": f">= lexical + {args.target_gain * 100:.0f} points, served",
            "measured": f"{compare['value'] * 100:+.1f} points (student {models['student']['macro_f1']:.3f}, lexical "
                        f"{compare['baseline_macro_f1']:.3f}; 90% interval{over} {compare['interval'][0] * 100:+.1f} to "
                        f"{compare['interval'][1] * 100:+.1f}); {'served' if served else 'not served'}",
            "met": "yes" if served and compare["value"] >= args.target_gain else "no",
        })
    runtimes = report.get("runtimes")
    if runtimes:  # the evaluate stage's check of every export on the same eval pairs
        int8, fp32 = runtimes["onnx-int8"], runtimes["onnx"]
        rows.append({
            "what": f"quickstart student as ONNX int8 vs fp32, eval set (`{how}`: the evaluate stage's check)",
            "target": "<= 0.5 macro-F1 points lost",
            "measured": f"{int8.get('loss_points', float('nan')):+.2f} points (int8 {int8.get('macro_f1', float('nan')):.4f}, "
                        f"torch {runtimes['torch']['macro_f1']:.4f}); ONNX fp32 within {fp32.get('max_abs_diff', 0):.1e} "
                        f"of torch; served runtime: {ev['outputs'].get('runtime')}",
            "met": "yes" if int8["passed"] else "no",
        })
    print(f"\nwall {wall:.0f} s; stages {seconds}; " + "; ".join(r["measured"] for r in rows))
    benchrecord.write("quickstart", vars(args),
                      {"wall_seconds": wall, "phase": status.phase, "stages": phases, "stage_seconds": seconds,
                       "stage_metrics": stage_metrics, "runtimes": runtimes,
                       "models": models, "gate": gate, "served": served}, rows,
                      tag=record_tag(args.world, args.validate_on, args.seed, args.objective, args.compare, args.votes,
                                     args.precision, args.log_queries, args.epochs, args.tag))


def record_tag(
    world: str | None,
    validate_on: str | None,
    seed: int | None,
    objective: str | None = None,
    compare: list[str] | None = None,
    votes: int | None = None,
    precision: str | None = None,
    log_queries: int | None = None,
    epochs: float | None = None,
    tag: str = "",
) -> str:
    """`<world>-validate-<value>-<objective>[-vs-<compared>]-votes<V>-log<N>-epochs<E>-<precision>-seed<N>`, each part
    only when its flag was given (seed 0 is the sample's), then `tag`."""
    parts = [world] if world else []
    if validate_on:
        parts.append(f"validate-{validate_on.lower()}")
    if objective or compare is not None:
        parts.append((objective or "sample") + ("-vs-" + "-".join(compare or ["none"]) if compare is not None else ""))
    if votes is not None:
        parts.append(f"votes{votes}")
    if log_queries is not None:
        parts.append(f"log{log_queries}")
    if epochs is not None:
        parts.append(f"epochs{epochs:g}")
    if precision:
        parts.append(precision)
    if seed:
        parts.append(f"seed{seed}")
    if tag:
        parts.append(tag)
    return "-".join(parts)


if __name__ == "__main__":
    main()
