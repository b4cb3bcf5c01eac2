"""Benchmark records: every script writes one, the summary tables are generated from them."""

import json
import re
import time
from pathlib import Path

import pytest

from kubedistill import benchrecord

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))


def _row(what: str = "x vs y") -> benchrecord.Row:
    return {"what": what, "target": ">= 2x", "measured": "2.5x", "met": "yes"}


def test_a_record_holds_machine_commit_arguments_numbers_and_rows(tmp_path):
    path = benchrecord.write("demo", {"seeds": [0, 1]}, {"ratio": 2.5, "runs": [2.4, 2.6]}, [_row()], tag="t",
                             records=tmp_path)
    assert path == tmp_path / "demo-t.json" and not list(tmp_path.glob("*.tmp"))
    record = json.loads(path.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]) and isinstance(record["dirty"], bool)
    assert {"cpu", "cores", "torch", "torch_threads", "ray", "python"} <= set(record["machine"])
    assert record["arguments"] == {"seeds": [0, 1]} and record["results"]["runs"] == [2.4, 2.6]
    (loaded,) = benchrecord.load(tmp_path)
    assert loaded["rows"] == [_row()] and loaded["file"] == "demo-t.json"


def test_a_records_machine_names_the_cpu_units_its_numbers_depend_on():
    """Two CPUs of one model name (here both "AMD EPYC") can differ in AVX-512 and bf16, which decide
    `precision: auto` and a step's time; the summary says which each record ran on."""
    assert benchrecord.cpu_features("fpu sse2 avx2 avx512f avx512bw avx512_bf16 sha_ni") == [
        "avx2", "avx512f", "avx512_bf16"]
    assert benchrecord.cpu_features("fpu sse2 avx2 fma") == ["avx2"]
    facts = benchrecord.machine()
    assert set(facts["cpu_features"]) <= set(benchrecord.CPU_FEATURES)  # this machine's, from /proc/cpuinfo
    base = {"cpu": "AMD EPYC", "cores": 2, "gpu": None}
    assert benchrecord._machine_text({**base, "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}) == (
        "AMD EPYC (avx2, avx512f, avx512_bf16), 2 cores, no GPU")
    assert benchrecord._machine_text({**base, "cpu_features": []}).startswith("AMD EPYC (none of avx2/")
    assert benchrecord._machine_text(base) == "AMD EPYC, 2 cores, no GPU"  # a record from before the field


def test_the_tree_is_dirty_when_code_differs_from_the_commit_not_when_a_record_was_rewritten(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    records = tmp_path / "benchmarks" / "records"
    records.mkdir(parents=True)
    (records / "x.json").write_text("{}")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    assert benchrecord.git_state(tmp_path, records)["dirty"] is False
    (records / "x.json").write_text('{"rewritten": true}')  # an earlier benchmark of the same pass
    assert benchrecord.git_state(tmp_path, records)["dirty"] is False
    (tmp_path / "code.py").write_text("a = 2\n")
    assert benchrecord.git_state(tmp_path, records)["dirty"] is True


def test_a_row_without_its_fields_or_a_file_that_is_not_a_record_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"missing \['met'\]"):
        benchrecord.write("demo", {}, {}, [{"what": "x", "target": "y", "measured": "z"}], records=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "notes.json").write_text(json.dumps({"benchmark": "x"}))
    with pytest.raises(ValueError, match="notes.json: not a benchmark record"):
        benchrecord.load(tmp_path)


def test_each_summary_row_names_its_script_date_and_commit(tmp_path):
    benchrecord.write("crsd_step", {}, {}, [_row("CRSD step | vs CE")], records=tmp_path)
    record = json.loads((tmp_path / "crsd_step.json").read_text())
    record.update(commit="0123456789abcdef" * 2 + "01234567", dirty=True, date="2026-12-01")
    (tmp_path / "crsd_step.json").write_text(json.dumps(record))
    table = benchrecord.summary_markdown(benchrecord.load(tmp_path))
    row = next(line for line in table.splitlines() if line.startswith("| CRSD"))
    assert row == ("| CRSD step \\| vs CE | >= 2x | 2.5x | yes | `crsd_step.py`, 2026-12-01, `0123456` "
                   "+ uncommitted changes |")
    benchrecord.write("crsd_step", {}, {}, [_row("CRSD tagged")], tag="long", records=tmp_path)
    table = benchrecord.summary_markdown(benchrecord.load(tmp_path))
    row = next(line for line in table.splitlines() if line.startswith("| CRSD tagged"))
    assert row.endswith(f"| `crsd_step.py` (`crsd_step-long.json`), {time.strftime('%Y-%m-%d')}, "
                        f"`{benchrecord.AT_IMPORT['commit'][:7]}`{' + uncommitted changes' if benchrecord.AT_IMPORT['dirty'] else ''} |")


# Scripts whose record is still to be made, each with why: the summary names them under its table.
NOT_YET_RECORDED: dict[str, str] = {}


def test_every_benchmark_script_writes_a_record_and_its_record_is_here():
    recorded = {r["benchmark"] for r in benchrecord.load()}
    for script in SCRIPTS:
        assert "benchrecord.write(" in (ROOT / "benchmarks" / f"{script}.py").read_text(), f"{script}.py writes no record"
        if script in NOT_YET_RECORDED:
            assert script not in recorded, f"{script} has a record now: take it off NOT_YET_RECORDED"
            continue
        assert script in recorded, f"no record of benchmarks/{script}.py in benchmarks/records/: run it"
    assert benchrecord.unrecorded(benchrecord.load()) == sorted(NOT_YET_RECORDED)
    assert recorded <= set(SCRIPTS), "a record of a script that no longer exists"
    for r in benchrecord.load():
        assert r["rows"], f"{r['file']}: no summary row"


def test_the_results_summary_is_generated_from_the_records_and_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert mod.render(results, ("benchmarks",)) == results, "benchmarks/RESULTS.md is stale: run `make docs`"
    records = benchrecord.load()
    table = benchrecord.summary_markdown(records, benchrecord.unrecorded(records))
    for script in NOT_YET_RECORDED:  # the gap is named under the table
        assert f"`{script}.py`" in table.split("No record yet")[1]
    assert table in results and table in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_against_the_current_package(script, monkeypatch):
    """A benchmark that no longer imports (a module moved) cannot reproduce its record."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{script}", ROOT / "benchmarks" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.main)
    assert "fair" in mod.__doc__.lower(), f"{script}.py: its docstring does not state its fairness conditions"
    text = (ROOT / "benchmarks" / f"{script}.py").read_text()
    assert text.rstrip().endswith('if __name__ == "__main__":\n    main()'), f"{script}.py never calls main()"
