"""The student on a real Ray Serve: scoring, bad input, readiness, a version switch under load, metrics."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from kubedistill.core.storage import Storage
from kubedistill.loadtest import LoadReport, run_load
from kubedistill.stages import serving
from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LABELS = ["irrelevant", "partial", "relevant"]
GOOD = {"query": "vegan brunch in Old Town", "services": [
    {"id": "a", "text": "Green Fork | restaurant | Old Town | $$ | offers vegan brunch"},
    {"id": "b", "text": "Iron Gym | fitness | Harbor | $ | offers weights"}]}


def _artifact(encoder: str, out: str, config_hash: str, seed: int, calibration: dict | None = None,
              formats: bool = False) -> str:
    import torch

    from kubedistill.core.spec import StudentSpec
    from kubedistill.stages import data
    from kubedistill.stages.student import StudentConfig, build_model, export, export_formats

    cfg = StudentConfig(StudentSpec(base_model=encoder, max_length=64), LABELS)
    torch.manual_seed(seed)
    model, tok = build_model(cfg)
    model.eval()
    extra = {"configHash": config_hash, **({"calibration": calibration} if calibration else {})}
    if formats:  # the ONNX exports, as the student stage writes them
        rows = data.generate(LABELS, 30, 20, 3, 1, 10, seed=seed).labeled[:20]
        extra["exports"] = export_formats(model, tok, cfg, Storage(out), 1.0, None, rows)
    return export(model, tok, cfg, Storage(out), extra)


@pytest.fixture(scope="module")
def served(tiny_encoder, tmp_path_factory):
    """A local Ray (its metrics port claimed like every other), Serve on a claimed port, v1 deployed."""
    from ray import serve

    from kubedistill.runner import local_ray

    root = tmp_path_factory.mktemp("serving")
    v1 = _artifact(tiny_encoder, str(root / "v1"), "1111111111111111", seed=1)
    # v2 carries a fitted temperature and decision offsets (an offset no probability can outweigh)
    v2 = _artifact(tiny_encoder, str(root / "v2"), "2222222222222222", seed=2,
                   calibration={"temperature": 2.5, "offsets": {"irrelevant": 0.0, "partial": 0.0, "relevant": 50.0}})
    v3 = _artifact(tiny_encoder, str(root / "v3"), "3333333333333333", seed=3, formats=True)
    port = free_port()
    with local_ray(num_cpus=4) as session:
        try:
            url = serving.deploy(serving.AppArgs(model=v1, maxServices=8, maxTextChars=200), port=port)
            yield {"url": url, "base": url.rsplit("/", 1)[0], "v1": v1, "v2": v2, "v3": v3, "port": port,
                   "metrics": session.head.metrics_port}
        finally:
            serve.shutdown()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw_post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_scores_every_service_with_the_model_version(served):
    status, body = serving.post_json(served["url"], GOOD)
    assert status == 200
    assert body["modelVersion"] == "crsd-111111111111+torch" and body["labels"] == LABELS
    assert [r["id"] for r in body["results"]] == ["a", "b"]
    for r in body["results"]:
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert 0 <= r["score"] <= 1
    # the served probabilities are the exported model's, from the standard input only
    from kubedistill.stages.student import load_student

    local = load_student(served["v1"]).predict_texts([GOOD["query"]] * 2, [s["text"] for s in GOOD["services"]])
    assert [r["probabilities"]["relevant"] for r in body["results"]] == pytest.approx(local[:, 2].tolist(), abs=1e-4)


def test_health_and_readiness(served):
    assert _get(served["base"] + "/healthz") == (200, {"status": "ok"})
    status, body = _get(served["base"] + "/readyz")
    assert status == 200 and body["ready"] and body["modelVersion"].startswith("crsd-")


def test_bad_input_is_a_4xx_naming_the_field_and_the_replica_keeps_serving(served):
    url = served["url"]
    cases = [
        (b"{oops", 400, "body"),
        (json.dumps({"services": GOOD["services"]}).encode(), 422, "query"),
        (json.dumps({"query": "q", "services": [{"id": "a"}]}).encode(), 422, "services[0].text"),
        (json.dumps({"query": "q", "services": [{"id": str(i), "text": "t"} for i in range(9)]}).encode(), 413, "services"),
        (json.dumps({"query": "q" * 201, "services": GOOD["services"]}).encode(), 422, "query"),
        (json.dumps({"query": "q", "services": [{"id": "a", "text": "t" * 300}]}).encode(), 422, "services[0].text"),
    ]
    for body, status, field in cases:
        got, answer = _raw_post(url, body)
        assert (got, answer["field"]) == (status, field), answer
        assert answer["error"].startswith(field + ":")
    assert serving.post_json(url, GOOD)[0] == 200


def test_hostile_requests_mixed_into_a_full_load_fail_alone(served):
    """Oversized, deeply nested, non-Unicode and over-long-id bodies, sent while good requests fill the batches:
    each gets its own 4xx, and every good request is answered 200."""
    url = served["url"]
    hostile = [
        (b'{"query": "q", "services": [{"id": "a", "text": "' + b"t" * 1_100_000 + b'"}]}', 413, "body"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body"),
        (b'{"query": "q", "services": [{"id": "a", "text": "\\ud800"}]}', 422, "services[0].text"),
        (json.dumps({"query": "q", "services": [{"id": "i" * 300, "text": "t"}]}).encode(), 422, "services[0].id"),
    ]
    report: list[LoadReport] = []
    load = threading.Thread(target=lambda: report.append(run_load(url, GOOD, concurrency=8, requests=120)))
    load.start()
    try:
        for _ in range(3):
            for body, status, field in hostile:
                got, answer = _raw_post(url, body)
                assert (got, answer.get("field")) == (status, field), answer
    finally:
        load.join()
    assert report[0].statuses == {200: 120}, report[0].summary()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _sample(text: str, name: str, le: str | None = None) -> float:
    """The sum over label sets of a Prometheus sample (`le`: one histogram bucket)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if le is None or f'le="{le}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_are_batched_and_none_fails(served):
    """16 clients at once against a replica that waits up to 100 ms to fill a batch of 8 pairs (4 requests of
    2 services): the app's own histogram of pairs per model call shows calls of more than one request."""
    app = dict(maxServices=8, maxTextChars=200)
    serving.deploy(serving.AppArgs(model=served["v1"], batchWaitMs=100, maxBatchPairs=8, **app), port=served["port"])
    try:
        before = _metrics(served["metrics"])
        report = run_load(served["url"], GOOD, concurrency=16, requests=160)
        assert report.statuses == {200: 160}, report.summary()
        pairs = "ray_kubedistill_scored_pairs_total"
        want = _sample(before, pairs) + 160 * len(GOOD["services"])
        _wait("the load's pairs in the exported metrics", lambda: _sample(_metrics(served["metrics"]), pairs) >= want)
        after = _metrics(served["metrics"])
        calls = _sample(after, "ray_kubedistill_batch_pairs_count") - _sample(before, "ray_kubedistill_batch_pairs_count")
        one_request = (_sample(after, "ray_kubedistill_batch_pairs_bucket", "2.0")
                       - _sample(before, "ray_kubedistill_batch_pairs_bucket", "2.0"))
        # 320 pairs in fewer model calls than requests: most calls carried several requests
        assert 0 < calls < 160 and calls - one_request > 0, (calls, one_request)
    finally:
        serving.deploy(serving.AppArgs(model=served["v1"], **app), port=served["port"])


def test_a_missing_artifact_is_refused_and_the_current_version_keeps_serving(served, tmp_path):
    with pytest.raises(FileNotFoundError, match="model: no student artifact"):
        serving.deploy(serving.AppArgs(model=str(tmp_path / "gone")), port=served["port"])
    broken = tmp_path / "broken"
    Storage(str(broken)).write_json("student.json", {"artifactVersion": 1, "labels": LABELS})
    with pytest.raises(FileNotFoundError, match="incomplete: head.safetensors, encoder/config.json missing"):
        serving.deploy(serving.AppArgs(model=str(broken)), port=served["port"])
    status, body = serving.post_json(served["url"], GOOD)
    assert status == 200 and body["modelVersion"] == "crsd-111111111111+torch"


def _wait(what: str, check, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_version_switch_under_load_drops_nothing(served):
    """The switch lands while requests are in flight: the same load sees v1 answers, then v2 answers, and
    no error. The load runs until the test stops it (after v2 answered it), not for a fixed time."""
    stop = threading.Event()
    live = LoadReport(concurrency=4, seconds=0.0)
    # a generous client timeout: requests may wait while the replica reloads on a crowded CI machine,
    # but every one must be answered, and answered 200
    load = threading.Thread(target=run_load, args=(served["url"], GOOD, 4),
                            kwargs={"duration_s": 600, "timeout_s": 180, "stop": stop, "report": live})
    load.start()
    try:
        _wait("the load's first answers", lambda: live.versions["crsd-111111111111+torch"] >= 4)
        serving.deploy(serving.AppArgs(model=served["v2"], maxServices=8, maxTextChars=200), port=served["port"])
        _wait("v2 answering the load", lambda: live.versions["crsd-222222222222+torch"] >= 4)
    finally:
        stop.set()
        load.join()
    assert live.server_errors == 0 and set(live.statuses) == {200}, live.summary()
    assert set(live.versions) == {"crsd-111111111111+torch", "crsd-222222222222+torch"}, live.versions
    status, body = serving.post_json(served["url"], GOOD)
    assert status == 200 and body["modelVersion"] == "crsd-222222222222+torch"
    # v2's stored calibration is what /score applies: its temperature in the probabilities, its offsets in the label
    from kubedistill.stages.student import load_student

    local = load_student(served["v2"]).predict_texts([GOOD["query"]] * 2, [s["text"] for s in GOOD["services"]])
    assert [r["probabilities"]["relevant"] for r in body["results"]] == pytest.approx(local[:, 2].tolist(), abs=1e-4)
    assert [r["label"] for r in body["results"]] == ["relevant", "relevant"]
    # and back: the switch reloads inside the running replica
    serving.deploy(serving.AppArgs(model=served["v1"], maxServices=8, maxTextChars=200), port=served["port"])
    _wait("v1 again", lambda: serving.post_json(served["url"], GOOD)[1].get("modelVersion") == "crsd-111111111111+torch")


def test_rerank_answers_cohere_sdk_clients_as_score_ranks(served):
    """Cohere's own Python SDK, pointed at the app (v2 and v1 clients), gets the documents ordered by /score's
    score; the same limits hold (a 413 the SDK raises as an API error)."""
    import cohere

    texts = [s["text"] for s in GOOD["services"]] + ["Harbor Cafe | cafe | Harbor | $ | offers coffee"]
    _, scored = serving.post_json(served["url"], {"query": GOOD["query"],
                                                  "services": [{"id": str(i), "text": t} for i, t in enumerate(texts)]})
    scores = [r["score"] for r in scored["results"]]
    best = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    v2 = cohere.ClientV2(api_key="unused", base_url=served["base"])
    answer = v2.rerank(model="kubedistill-student", query=GOOD["query"], documents=texts, top_n=2)
    assert [r.index for r in answer.results] == best[:2]
    assert [r.relevance_score for r in answer.results] == pytest.approx([scores[i] for i in best[:2]], abs=1e-6)
    v1 = cohere.Client(api_key="unused", base_url=served["base"])
    answer = v1.rerank(model="kubedistill-student", query=GOOD["query"], documents=texts, return_documents=True)
    assert [r.index for r in answer.results] == best
    assert [r.document.text for r in answer.results] == [texts[i] for i in best]
    with pytest.raises(cohere.core.ApiError) as e:
        v2.rerank(model="m", query=GOOD["query"], documents=["d"] * 9)  # maxServices is 8
    assert e.value.status_code == 413 and e.value.body["field"] == "documents"
    status, body = _raw_post(served["base"] + "/rerank", json.dumps({"query": "q", "documents": [{"title": "x"}]}).encode())
    assert (status, body["field"]) == (422, "documents[0].text")


def test_the_openapi_document_is_served(served):
    status, doc = _get(served["base"] + "/openapi.json")
    assert status == 200 and doc == serving.openapi_document()


def test_onnx_runtimes_serve_the_exported_graph_and_their_version_names_them(served):
    from kubedistill.stages.student import load_runtime

    app = dict(maxServices=8, maxTextChars=200)
    with pytest.raises(FileNotFoundError, match="runtime: onnx needs the student's ONNX export"):
        serving.deploy(serving.AppArgs(model=served["v1"], runtime="onnx", **app), port=served["port"])
    texts = [s["text"] for s in GOOD["services"]]
    try:
        for runtime in ("onnx-int8", "onnx"):
            serving.deploy(serving.AppArgs(model=served["v3"], runtime=runtime, **app), port=served["port"])
            version = f"crsd-333333333333+{runtime}"
            _wait(f"{runtime} answering", lambda v=version: serving.post_json(served["url"], GOOD)[1].get("modelVersion") == v)
            status, body = serving.post_json(served["url"], GOOD)
            local = load_runtime(served["v3"], runtime).predict_texts([GOOD["query"]] * 2, texts)
            assert status == 200 and [r["probabilities"][lab] for r in body["results"] for lab in LABELS] == \
                pytest.approx(local.ravel().tolist(), abs=1e-5)
    finally:
        serving.deploy(serving.AppArgs(model=served["v1"], **app), port=served["port"])
        _wait("v1 again", lambda: serving.post_json(served["url"], GOOD)[1].get("modelVersion") == "crsd-111111111111+torch")


def test_prometheus_metrics_include_the_apps_and_serves_own(served):
    """What the chart's dashboard and alerts query from a Ray pod (tests/unit/test_chart.py lists it) is exported
    by a live Serve: a misnamed query would show an empty panel and an alert that never fires."""
    from tests.unit.test_chart import chart_ray_metrics

    for _ in range(3):
        serving.post_json(served["url"], GOOD)
    want = ("ray_kubedistill_score_requests", "ray_kubedistill_batch_pairs", "ray_kubedistill_model_latency_ms",
            "ray_serve_num_http_requests", *sorted(chart_ray_metrics()))
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{served['metrics']}/metrics", timeout=10) as r:
            text = r.read().decode()
        if all(w in text for w in want):
            break
        time.sleep(3)
    missing = [w for w in want if w not in text]
    assert not missing, f"not exported: {missing}"
    assert 'status="200"' in text


@pytest.mark.cost(60)
@pytest.mark.timeout(300)
def test_load_60s_at_concurrency_32_has_no_5xx(served):
    report = run_load(served["url"], GOOD, concurrency=32, duration_s=60)
    summary = report.summary(len(GOOD["services"]))
    print("load test:", summary)
    assert report.server_errors == 0, summary
    assert report.requests > 0 and set(report.statuses) == {200}, summary
