"""`kubedistill run` through the serve stage: data → student → evaluate → serve from S3, the printed
curl example answering, Ctrl-C stopping it; a failed gate skips serving; a busy port says what to do."""

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import time

import pytest

from kubedistill import runner
from kubedistill.core import spec
from kubedistill.core.stage import MANIFEST
from kubedistill.core.storage import Storage
from kubedistill.stages.data import read_dataset, service_text
from tests.conftest import artifact, free_port, minimal_doc
from tests.isolated import score_onnx_fresh
from tests.integration.test_runner import _cli, _write

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = {"services": 60, "queries": 40, "pairsPerQuery": 5, "sftSize": 20, "evalSize": 60, "seed": 1}


def _doc(uri: str, name: str, encoder: str, min_f1: float) -> dict:
    doc = minimal_doc(storage={"uri": uri}, data={"synthetic": SMALL},
                      teacher={"enabled": False}, annotation={"enabled": False}, pruning={"enabled": False},
                      student={"baseModel": encoder, "maxLength": 48, "maxReasoningTokens": 24, "objective": "ce",
                               "train": {"batchSize": 16, "learningRate": 1e-3, "epochs": 1},
                               "resources": {"workers": 1}},
                      evaluation={"minMacroF1": min_f1, "minGainOverBaseline": -1.0}, serving={"maxServices": 10})
    doc["metadata"]["name"] = name
    return doc


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            assert proc.poll() is None, "".join(seen)
            continue
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} not printed in {timeout}s:\n" + "".join(seen[-40:]))


@pytest.mark.cost(85)
def test_run_serves_the_student_from_s3_and_the_printed_curl_works(bucket, tiny_encoder, tmp_path):
    port = free_port()
    f = _write(tmp_path, _doc(f"s3://{bucket}/runs", "served", tiny_encoder, min_f1=0.0))
    proc = _cli("run", str(f), "--serve-port", str(port), env=dict(os.environ))
    try:
        text = _read_until(proc, "serving until interrupted", timeout=600)
        assert "[4/4] serve: succeeded" in text
        curl = next(line.split("try: ", 1)[1].strip() for line in text.splitlines() if "try: curl" in line)
        assert f"http://127.0.0.1:{port}/score" in curl
        answer = json.loads(subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30, check=True).stdout)
        request = json.loads(shlex.split(curl)[-1])
        # the example is a held-out query of this run's own data, its answer printed beside the true labels
        eval_rows = read_dataset(artifact(Storage(f"s3://{bucket}/runs/served"), "data").child("eval"))
        held_out = {(r["query"], service_text(r)): r["label"] for r in eval_rows}
        truth = [held_out[(request["query"], s["text"])] for s in request["services"]]
        assert truth[0] == "relevant" and len(set(truth)) > 1
        assert [r["id"] for r in answer["results"]] == [s["id"] for s in request["services"]]
        for r, t in zip(answer["results"], truth, strict=True):
            assert f"{r['id']} {r['label']:<10} (score {r['score']:.2f}; true label {t}):" in text
        st = Storage(f"s3://{bucket}/runs/served")
        manifest = st.read_json(f"serve/{MANIFEST}")
        student = st.read_json(f"student-crsd/{MANIFEST}")
        evaluated = st.read_json(f"evaluate/{MANIFEST}")
        runtime = evaluated["outputs"]["runtime"]  # the fastest runtime whose check on the eval set passed
        assert evaluated["metrics"]["runtimes"][runtime]["passed"] and manifest["outputs"]["runtime"] == runtime
        assert evaluated["metrics"]["runtimes"]["onnx"]["passed"]  # fp32 ONNX is the model, to 1e-4
        assert answer["modelVersion"] == manifest["outputs"]["modelVersion"] == f"ce-{student['version'][:12]}+{runtime}"
        # the version the gate passed, by name: what a RayService's config names too
        assert manifest["outputs"]["model"] == f"s3://{bucket}/runs/served/student-crsd/v-{student['version']}/model"
        assert manifest["outputs"]["model"] == st.read_json(f"evaluate/{MANIFEST}")["outputs"]["model"]
        assert st.read_json("_PROMOTED.json")["version"] == student["version"]
        # the exported student, copied off S3, in a Python with only onnxruntime and tokenizers: /score's answer
        onnx_dir = tmp_path / "onnx"
        model = Storage(manifest["outputs"]["model"])
        onnx_dir.mkdir()
        for rel in model.list("onnx"):  # onnx/model.onnx, onnx/tokenizer.json, ...
            (onnx_dir / rel.split("/", 1)[1]).write_bytes(model.read_bytes(rel))
        graph = "model-int8.onnx" if runtime == "onnx-int8" else "model.onnx"
        texts = [s["text"] for s in request["services"]]
        fresh, loaded = score_onnx_fresh(onnx_dir, request["query"], texts, graph)
        assert loaded <= {"onnxruntime", "tokenizers", "numpy"}, loaded
        for got, served in zip(fresh, answer["results"], strict=True):
            assert got["probabilities"] == pytest.approx(served["probabilities"], abs=1e-4)
            assert got["score"] == pytest.approx(served["score"], abs=1e-4)
        proc.send_signal(signal.SIGTERM)  # what `kill`, `timeout` or a supervisor sends
        assert proc.wait(60) == 0
        assert "stopped serving" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with socket.socket() as s:  # the app went with the local cluster
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.cost(80)
def test_failed_gate_skips_serving_and_a_busy_port_says_what_to_do(tmp_path, tiny_encoder, ray_address):
    run = spec.parse_run(_doc(str(tmp_path / "store"), "gated", tiny_encoder, min_f1=0.99))
    out = io.StringIO()
    # the shared head: this run never reaches Serve (the gate stops it before its job is submitted)
    status = runner.run_local(run, address=ray_address, out=out, serve_port=free_port())
    serve = next(s for s in status.stages if s.name == "serve")
    assert serve.phase == "Skipped" and "not promoted" in serve.message
    assert any(c.type == "Promoted" and c.status == "False" for c in status.conditions)
    assert not (tmp_path / "store" / "gated" / "_PROMOTED.json").exists()  # nothing recorded as servable

    passing = spec.parse_run(_doc(str(tmp_path / "store"), "gated", tiny_encoder, min_f1=0.0))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = io.StringIO()
        with pytest.raises(runner.RunFailed, match=r"port \d+ on 127.0.0.1 is busy: .*--serve-port"):
            # the shared head too: the serve stage finds the port busy before it starts Serve there
            runner.run_local(passing, address=ray_address, out=out, serve_port=busy.getsockname()[1])
    assert "student-crsd: done earlier, skipped" in out.getvalue()  # only the gate's config changed
