"""Benchmark records: what a benchmark script measured, where, on which code, with which arguments.

Every script in `benchmarks/` ends by calling `write(...)`: one JSON file per invocation under
`benchmarks/records/` holding the machine (CPU model, cores, torch threads, library versions), the date,
the git commit (and whether the tree had uncommitted changes), the script's arguments, every number it
measured (`results`, with the spread over repetitions or seeds), and the rows it contributes to the
summary table (`rows`: what, target, measured, met?), formatted by the script from its own numbers.
`make docs` (`scripts/render_readme.py`) renders RESULTS.md's summary and the README's benchmark table
from these files with `summary_markdown`, so no number in either is typed by hand; each row names the
record's date and commit.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, TypedDict

RECORDS = Path(__file__).resolve().parent.parent / "benchmarks" / "records"


class Row(TypedDict):
    what: str
    target: str
    measured: str
    met: str


#: the CPU's vector and matrix units a number can depend on: two CPUs of one model name differ in them, and
#: `resources.precision: auto` trains in bf16 only with AVX-512 BF16 or AMX
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_features(flags: str) -> list[str]:
    """Those of `CPU_FEATURES` that a /proc/cpuinfo `flags` line lists."""
    have = set(flags.split())
    return [f for f in CPU_FEATURES if f in have]


def machine() -> dict[str, Any]:
    """The facts a number depends on: CPU (its model and `CPU_FEATURES`), cores this process may use, torch
    threads, library versions."""
    facts: dict[str, Any] = {"cpu": "?", "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        facts["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
        flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), None)
        if flags is not None:
            facts["cpu_features"] = cpu_features(flags)
    try:
        import torch

        facts["torch"], facts["torch_threads"] = torch.__version__, torch.get_num_threads()
        facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency; the operator benchmark does not need it
        pass
    for lib in ("ray", "transformers", "vllm", "kopf"):
        try:
            facts[lib] = __import__(lib).__version__
        except (ImportError, AttributeError):
            continue
    return facts


def git_state(root: Path = RECORDS.parent.parent, records: Path = RECORDS) -> dict[str, Any]:
    """The commit the numbers were measured on, and whether the working tree differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    # the records are tracked too: a run that rewrote one does not make the code differ from the commit
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":!{records.relative_to(root)}")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(changed)}


# captured when a benchmark script imports this module, i.e. the code it started with (a long run's record
# must not name a commit made while it ran)
AT_IMPORT = git_state()


def write(
    benchmark: str,
    arguments: dict[str, Any],
    results: dict[str, Any],
    rows: list[Row],
    tag: str = "",
    records: Path = RECORDS,
) -> Path:
    """Write the record of one invocation to `<records>/<benchmark>[-<tag>].json` (replacing the previous
    record of the same benchmark and tag: the file is the latest measurement, git keeps the history).
    Written to a temporary name and renamed, so a run that dies leaves the previous record whole."""
    for row in rows:
        missing = {"what", "target", "measured", "met"} - set(row)
        if missing:
            raise ValueError(f"summary row {row!r}: missing {sorted(missing)}")
    record = {
        "benchmark": benchmark,
        "tag": tag,
        "date": time.strftime("%Y-%m-%d"),
        **AT_IMPORT,
        "machine": machine(),
        "arguments": arguments,
        "results": results,
        "rows": rows,
    }
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{benchmark}{'-' + tag if tag else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    print(f"record: {path}")
    return path


def load(records: Path = RECORDS) -> list[dict[str, Any]]:
    """Every record, in file-name order."""
    out = []
    for path in sorted(records.glob("*.json")):
        record = json.loads(path.read_text())
        for key in ("benchmark", "date", "commit", "machine", "arguments", "results", "rows"):
            if key not in record:
                raise ValueError(f"{path}: not a benchmark record (no {key!r})")
        out.append({**record, "file": path.name})
    return out


# The summary's order: the product's path first (quickstart), then by stage.
ORDER = [
    "quickstart",
    "crsd_step",
    "crsd_quality",
    "imbalance",
    "byo_labels",
    "annotate_throughput",
    "serve_latency",
    "operator_scale",
    "prune_search",
    "prune_recovery",
    "teacher_step",
]


def _machine_text(m: dict[str, Any]) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    features = m.get("cpu_features")  # absent from records made before it was recorded
    units = "" if features is None else f" ({', '.join(features) or 'none of ' + '/'.join(CPU_FEATURES)})"
    return f"{m['cpu']}{units}, {m['cores']} cores{gpu}"


def unrecorded(records: list[dict[str, Any]], scripts_dir: Path = RECORDS.parent) -> list[str]:
    """The benchmark scripts that have no record yet."""
    have = {r["benchmark"] for r in records}
    return sorted(p.stem for p in scripts_dir.glob("*.py") if p.stem not in have)


def summary_markdown(records: list[dict[str, Any]], missing: list[str] | None = None) -> str:
    """The summary table: every row of every record, each with its script (and record file, where one script
    writes several), date, commit and machine; then
    the scripts with no record (`missing`), named so the gap shows."""
    rank = {name: i for i, name in enumerate(ORDER)}
    ordered = sorted(records, key=lambda r: (rank.get(r["benchmark"], len(ORDER)), r["benchmark"], r.get("tag", "")))
    machines = sorted({_machine_text(r["machine"]) for r in ordered})
    lines = [
        "Generated by `make docs` from the JSON records in `benchmarks/records/` (each written by the script",
        "that measured it; never typed). Machines: " + "; ".join(machines) + ".",
        "",
        "| what | target | measured | met? | record |",
        "|---|---|---|---|---|",
    ]
    for r in ordered:
        dirty = " + uncommitted changes" if r.get("dirty") else ""
        tagged = f" (`{r['benchmark']}-{r['tag']}.json`)" if r.get("tag") else ""  # one script, several records
        source = f"`{r['benchmark']}.py`{tagged}, {r['date']}, `{r['commit'][:7]}`{dirty}"
        for row in r["rows"]:
            cells = [row["what"], row["target"], row["measured"], row["met"], source]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if missing:
        names = ", ".join(f"`{m}.py`" for m in missing)
        lines += [
            "",
            f"No record yet (not re-measured since records began; see its dated section in RESULTS.md): {names}.",
        ]
    return "\n".join(lines) + "\n"
