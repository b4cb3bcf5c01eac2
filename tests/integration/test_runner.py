"""The local runner on a real Ray cluster: stages as Ray jobs, S3 artifacts, resume, failure."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.holds import HOLD_AT_ENV, HOLD_DIR_ENV
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages import data
from tests.conftest import ROOT, artifact, minimal_doc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = {"services": 60, "queries": 60, "pairsPerQuery": 5, "sftSize": 40, "evalSize": 80, "seed": 1}
ONLY_DATA_EVAL = {"teacher": {"enabled": False}, "annotation": {"enabled": False}, "student": {"enabled": False},
                  "pruning": {"enabled": False}, "serving": {"enabled": False}}


def _doc(uri: str, name: str = "it-run", **extra) -> dict:
    doc = minimal_doc(storage={"uri": uri}, data={"synthetic": SMALL}, **ONLY_DATA_EVAL, **extra)
    doc["metadata"]["name"] = name
    return doc


def test_run_on_s3_then_rerun_skips_everything(bucket, ray_address):
    run = spec.parse_run(_doc(f"s3://{bucket}/runs"))
    out = io.StringIO()
    status = runner.run_local(run, address=ray_address, out=out)
    assert status.phase == "Succeeded"
    assert [(s.name, s.phase) for s in status.stages] == [("data", "Succeeded"), ("evaluate", "Succeeded")]
    st = Storage(f"s3://{bucket}/runs/it-run")
    files = st.list()
    data_v, eval_v = (st.read_json(f"{s}/_SUCCESS.json")["version"] for s in ("data", "evaluate"))
    for f in ("data/_SUCCESS.json", f"data/v-{data_v}/eval/part-00000.parquet", f"evaluate/v-{eval_v}/metrics.json",
              f"evaluate/v-{eval_v}/confusion.png", f"evaluate/v-{eval_v}/_SUCCESS.json", "evaluate/_SUCCESS.json",
              "_status.json"):
        assert f in files, files
    m = st.read_json("data/_SUCCESS.json")["metrics"]
    assert m["rows_in"] == m["rows_written"] + m["rows_quarantined"]
    report = artifact(st, "evaluate").read_json("metrics.json")
    assert report["gate"]["candidate"] == "baseline" and 0 < report["models"]["baseline"]["macro_f1"] <= 1
    assert json.loads(st.read_text("_status.json"))["phase"] == "Succeeded"
    text = out.getvalue()
    assert "[1/2] data: running" in text and "[2/2] evaluate: succeeded" in text
    # the run report: written to storage when the run ends, its path printed
    assert f"run report at s3://{bucket}/runs/it-run/report.html" in text
    page = st.read_text("report.html")
    assert "Gate (<code>evaluation.minMacroF1</code>" in page and "lexical BM25 + logistic regression" in page
    assert "data:image/png;base64," in page  # the confusion matrices, embedded
    assert st.read_json("evaluate/_SUCCESS.json")["digest"] in page and "<h2>Lineage</h2>" in page
    # progress: the stage's line (a plain line per update: not a terminal), its report in storage; driver logs kept
    assert "    evaluate ▸ scoring: 1/1 models (100%)" in text
    assert st.read_json("evaluate/_PROGRESS.json")["done"] == 1
    for stage in ("data", "evaluate"):
        (log,) = [f for f in files if f.startswith(f"{stage}/logs/")]
        assert f"[{stage}] done in" in st.read_text(log)
        assert f"<a href='{log}'>latest</a>" in page

    first = st.read_json("evaluate/_SUCCESS.json")
    out2 = io.StringIO()
    runner.run_local(run, address=ray_address, out=out2)
    assert out2.getvalue().count("done earlier, skipped") == 2
    assert st.read_json("evaluate/_SUCCESS.json") == first


def test_edits_rerun_what_they_touch_and_everything_downstream(tmp_path, ray_address):
    """The local runner walks the same edits through the same step policy as the operator."""
    def run(**patch) -> str:
        doc = _doc(str(tmp_path / "store"), name="edits")
        for section, fields in patch.items():
            doc["spec"].setdefault(section, {}).update(fields)
        out = io.StringIO()
        assert runner.run_local(spec.parse_run(doc), address=ray_address, out=out).phase == "Succeeded"
        return out.getvalue()

    run()
    st = Storage(str(tmp_path / "store" / "edits"))
    first = st.read_json("evaluate/_SUCCESS.json")
    leaf = run(evaluation={"minMacroF1": 0.1})  # a leaf edit: only evaluate
    assert "[1/2] data: done earlier, skipped" in leaf and "[2/2] evaluate: rerunning: its config changed" in leaf
    upstream = run(evaluation={"minMacroF1": 0.1}, data={"synthetic": {**SMALL, "seed": 7}})
    assert "[1/2] data: rerunning: its config changed" in upstream
    assert "[2/2] evaluate: rerunning: input data changed" in upstream
    assert st.read_json("evaluate/_SUCCESS.json")["inputs"] == {"data": st.read_json("data/_SUCCESS.json")["digest"]}
    assert st.read_json("evaluate/_SUCCESS.json")["digest"] != first["digest"]


def _write(tmp_path: Path, doc: dict) -> Path:
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _cli(*args: str, stdout: Any = subprocess.PIPE, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kubedistill.cli", *args], cwd=ROOT, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def kill_at(f: Path, point: str, until: Callable[[], bool] = lambda: True, timeout: float = 600) -> str:
    """Run `kubedistill run f` with a hold at `point` (kubedistill.core.holds); once a process has stopped
    there (and `until()` is true), SIGKILL the CLI, its Ray and every stage process. No sleeping: the
    run cannot get past the point, so the test interrupts it exactly there. Returns the run's output."""
    holds, log = f.parent / "holds", f.parent / f"run-{point}.log"
    with open(log, "w") as fh:
        proc = _cli("run", str(f), env={**os.environ, HOLD_AT_ENV: point, HOLD_DIR_ENV: str(holds)}, stdout=fh)
        deadline = time.monotonic() + timeout
        while not ((holds / point).exists() and until()):
            assert proc.poll() is None, f"the run ended before reaching {point}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{point} not reached in {timeout}s:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # no cleanup of any kind: the whole process group dies
        proc.wait()
    return log.read_text()


def checkpoint_registered(stage_dir: Path) -> Callable[[], bool]:
    """Ray Train has recorded a checkpoint (its manager's snapshot names one): a restart resumes from it."""
    def check() -> bool:
        for snap in stage_dir.glob("v-*/ray/*/checkpoint_manager_snapshot.json"):  # in the version being built
            try:
                if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                    return True
            except ValueError:  # being written
                pass
        return False
    return check


@pytest.mark.cost(45)
def test_run_stages_runs_only_the_named_stages_and_keeps_what_is_done(tmp_path, ray_head):
    """`runner.run_stages` (the benchmarks' stage-by-stage runs): only the named stages run; a stage done for
    the spec skips itself; a changed config reruns it into a new version and its named dependents after it."""
    doc = _doc(str(tmp_path / "store"), name="by-stage")
    first = runner.run_stages(spec.parse_run(doc), ("data",), ray_head.dashboard_url)
    st = Storage(str(tmp_path / "store" / "by-stage"))
    assert st.exists("data/_SUCCESS.json") and not st.exists("evaluate/_SUCCESS.json")
    assert runner.run_stages(spec.parse_run(doc), ("data",), ray_head.dashboard_url) == first  # done: the same manifest
    doc["spec"]["data"]["synthetic"]["seed"] = 7
    again = runner.run_stages(spec.parse_run(doc), ("data", "evaluate"), ray_head.dashboard_url)
    assert again["data"]["artifact"] != first["data"]["artifact"]
    assert again["evaluate"]["inputs"] == {"data": again["data"]["digest"]}
    # a stage that fails raises with the error its job recorded, not a bare exit status
    doc["spec"]["data"] = {"logs": str(tmp_path / "missing.jsonl"), "evalSet": str(tmp_path / "missing-eval.jsonl")}
    with pytest.raises(runner.RunFailed, match="stage data failed: .*missing") as e:
        runner.run_stages(spec.parse_run(doc), ("data", "evaluate"), ray_head.dashboard_url)
    assert e.value.stage == "data"


def test_killed_run_resumes_with_only_unfinished_stages(tmp_path):
    f = _write(tmp_path, _doc(str(tmp_path / "store"), name="killme"))
    manifest = tmp_path / "store" / "killme" / "data" / MANIFEST
    kill_at(f, "data.manifest-written")
    assert manifest.exists()
    assert not (tmp_path / "store" / "killme" / "evaluate" / MANIFEST).exists()
    data_manifest = manifest.read_text()

    again = _cli("run", str(f))
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text
    assert "[1/2] data: done earlier, skipped" in text
    assert "[2/2] evaluate: succeeded" in text
    assert manifest.read_text() == data_manifest  # finished work was not redone
    status = _cli("status", str(f))
    out, _ = status.communicate(timeout=60)
    assert status.returncode == 0 and "run killme: Succeeded" in out
    report = tmp_path / "store" / "killme" / "report.html"
    report.unlink()
    again = _cli("report", str(f))
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and out.strip() == str(report) and "killme" in report.read_text()


def test_failing_stage_stops_the_run_and_keeps_finished_stages(tmp_path, ray_address):
    """User data whose only labeled training set has one label: the baseline cannot be fit."""
    src = tmp_path / "src"
    src.mkdir()
    row = {"query": "sushi", "service_id": "s1", "service_title": "Sakura Sushi", "service_tags": ["sushi"]}
    (src / "logs.jsonl").write_text("\n".join(json.dumps({**row, "service_id": f"s{i}"}) for i in range(5)))
    (src / "eval.jsonl").write_text("\n".join(json.dumps({**row, "label": l, "reasoning": "r"})
                                              for l in ("relevant", "irrelevant", "partial")))
    (src / "sft.jsonl").write_text(json.dumps({**row, "label": "relevant", "reasoning": "offers sushi"}))
    doc = _doc(str(tmp_path / "store"), name="fails")
    doc["spec"]["data"] = {"logs": str(src / "logs.jsonl"), "evalSet": str(src / "eval.jsonl"),
                           "sftSeed": str(src / "sft.jsonl")}
    run = spec.parse_run(doc)
    out = io.StringIO()
    with pytest.raises(runner.RunFailed, match="two distinct labels"):
        runner.run_local(run, address=ray_address, out=out)
    st = Storage(str(tmp_path / "store" / "fails"))
    assert st.exists(f"data/{MANIFEST}") and not st.exists(f"evaluate/{MANIFEST}")
    status = st.read_json("_status.json")
    assert status["phase"] == "Failed"
    ev = next(s for s in status["stages"] if s["name"] == "evaluate")
    assert ev["phase"] == "Failed" and "two distinct labels" in ev["message"]
    page = st.read_text("report.html")  # a failed run gets its report too, saying why
    assert "<span class='bad'>Failed</span>" in page and "two distinct labels" in page
    (log,) = st.list("evaluate/logs")  # the failed stage's driver log, kept and linked
    assert "Traceback" in st.read_text(log) and "two distinct labels" in st.read_text(log)
    assert f"<a href='{log}'>latest</a>" in page
    assert "run report at" in out.getvalue()


def test_ingest_user_logs_from_s3_quarantines_bad_rows(bucket, tmp_path, ray_address):
    c = Storage(f"s3://{bucket}/input")
    good = {"query": "hot pot near harbor", "service_id": "s1", "service_title": "Golden Hotpot",
            "service_category": "hotpot restaurant", "service_district": "Harbor", "service_price_level": 2,
            "service_tags": ["hotpot"], "service_description": "A hotpot place."}
    logs = [json.dumps({**good, "service_id": f"s{i}"}) for i in range(20)]
    logs[3] = "{broken json"
    logs[7] = json.dumps({**good, "service_price_level": "cheap"})
    c.write_text("logs/day1.jsonl", "\n".join(logs[:10]))
    c.write_text("logs/day2.jsonl", "\n".join(logs[10:]))
    labeled = [json.dumps({**good, "service_id": f"e{i}", "label": ["irrelevant", "partial", "relevant"][i % 3],
                           "reasoning": "because"}) for i in range(30)]
    labeled.append(json.dumps({**good, "label": "meh", "reasoning": "x"}))
    c.write_text("eval.jsonl", "\n".join(labeled))
    c.write_text("sft.jsonl", "\n".join(labeled[:12]))
    doc = _doc(f"s3://{bucket}/runs", name="byo")
    doc["spec"]["data"] = {"logs": c.uri("logs/"), "evalSet": c.uri("eval.jsonl"), "sftSeed": c.uri("sft.jsonl"),
                           "format": "jsonl"}
    runner.run_local(spec.parse_run(doc), address=ray_address, out=io.StringIO())
    st = Storage(f"s3://{bucket}/runs/byo")
    m = st.read_json(f"data/{MANIFEST}")["metrics"]
    assert m["logs"] == {"rows_in": 20, "rows_written": 18, "rows_quarantined": 2}
    assert m["eval"] == {"rows_in": 31, "rows_written": 30, "rows_quarantined": 1}
    out = artifact(st, "data")
    q = [json.loads(line) for line in out.read_text("quarantine/logs.jsonl").splitlines()]
    assert sorted((Path(x["source"]).name, x["row"]) for x in q) == [("day1.jsonl", 4), ("day1.jsonl", 8)]
    assert any("service_price_level" in x["reason"] for x in q)
    assert out.list("logs") == ["logs/part-00000.jsonl", "logs/part-00001.jsonl"]



    # rerun on fewer files, in another format: a new version holding only the new rows (in = written +
    # quarantined), the old version intact beside it, evaluate rerun on the new one
    first = st.read_json(f"data/{MANIFEST}")
    c.write_text("logs-v2/day1.jsonl", "\n".join(logs[:10]))
    doc["spec"]["data"].update(logs=c.uri("logs-v2/"), format="parquet")
    text = io.StringIO()
    runner.run_local(spec.parse_run(doc), address=ray_address, out=text)
    assert "[1/2] data: rerunning: its config changed" in text.getvalue()
    assert "[2/2] evaluate: rerunning: input data changed" in text.getvalue()
    now = st.read_json(f"data/{MANIFEST}")
    assert now["version"] != first["version"] and now["metrics"]["logs"] == {"rows_in": 10, "rows_written": 8,
                                                                             "rows_quarantined": 2}
    new = artifact(st, "data")
    assert new.list("logs") == ["logs/part-00000.parquet"] and len(data.read_dataset(new.child("logs"))) == 8
    assert len(data.read_dataset(new.child("eval"))) == 30  # not 60: no part of the old version is read again
    assert out.list("logs") == ["logs/part-00000.jsonl", "logs/part-00001.jsonl"]  # the old version, untouched
    assert st.read_json(f"evaluate/{MANIFEST}")["inputs"]["data"] == now["digest"]
