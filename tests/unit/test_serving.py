"""Serving's pure parts: request checks, the response, the app's args."""

import json
import shlex

import numpy as np
import pytest

from kubedistill.core import spec
from kubedistill.stages import serving
from kubedistill.stages.serving import RequestError, parse_request, score_results
from tests.conftest import minimal_doc

LABELS = ["irrelevant", "partial", "relevant"]


def _parse(doc, max_services=3, max_chars=20):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_request(body, max_services, max_chars)


def _refused(doc, **kw) -> RequestError:
    with pytest.raises(RequestError) as e:
        _parse(doc, **kw)
    return e.value


def test_a_good_request_parses_and_keeps_extra_service_fields():
    req = _parse({"query": "vegan brunch", "services": [{"id": "a", "text": "Green Fork", "rank": 3}]})
    assert req.query == "vegan brunch" and req.services[0].id == "a" and req.services[0].text == "Green Fork"


@pytest.mark.parametrize(
    ("doc", "status", "field", "says"),
    [
        (b"{not json", 400, "body", "not valid JSON"),
        (b"\xff\xfe", 400, "body", "not valid JSON"),
        ([1, 2], 422, "body", "got list"),
        ({"services": [{"id": "a", "text": "x"}]}, 422, "query", "Field required"),
        ({"query": "", "services": [{"id": "a", "text": "x"}]}, 422, "query", "at least 1 character"),
        ({"query": "q"}, 422, "services", "Field required"),
        ({"query": "q", "services": []}, 422, "services", "at least 1 item"),
        ({"query": "q", "services": "abc"}, 422, "services", "valid list"),
        ({"query": "q", "services": [{"id": "a", "text": "x"}, {"id": "b"}]}, 422, "services[1].text", "Field required"),
        ({"query": "q", "services": [{"id": 7, "text": "x"}]}, 422, "services[0].id", "valid string"),
        ({"query": "q", "service": [], "services": [{"id": "a", "text": "x"}]}, 422, "service", "unknown field"),
        ({"query": "q", "services": [{"id": str(i), "text": "x"} for i in range(4)]}, 413, "services", "at most 3 per request, got 4"),
        ({"query": "q" * 21, "services": [{"id": "a", "text": "x"}]}, 422, "query", "longer than 20 characters (got 21)"),
        ({"query": "q", "services": [{"id": "a", "text": "x"}, {"id": "b", "text": "y" * 30}]}, 422, "services[1].text",
         "longer than 20 characters (got 30)"),
    ],
)
def test_bad_requests_name_the_field(doc, status, field, says):
    e = _refused(doc)
    assert (e.status, e.field) == (status, field)
    assert says in e.message
    assert e.body()["error"].startswith(f"{field}: ")


def test_every_problem_is_listed_not_just_the_first():
    e = _refused({"query": "", "services": [{"id": "a"}, {"text": "t"}]})
    assert [x["field"] for x in e.errors] == ["query", "services[0].text", "services[1].id"]


def test_results_hand_computed():
    probs = np.array([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    out = score_results(probs, LABELS, ["a", "b"])
    assert out[0] == {"id": "a", "label": "relevant",
                      "probabilities": {"irrelevant": 0.2, "partial": 0.3, "relevant": 0.5},
                      "score": pytest.approx(0.3 * 0.5 + 0.5 * 1.0)}
    assert out[1]["label"] == "irrelevant" and out[1]["score"] == pytest.approx(0.2 * 0.5 + 0.1)
    two = score_results(np.array([[0.25, 0.75]]), ["no", "yes"], ["x"])
    assert two[0]["score"] == pytest.approx(0.75)


def test_app_args_come_from_the_run_spec():
    run = spec.parse_run(minimal_doc(storage={"uri": "s3://b/runs", "endpoint": "http://s3:9000"},
                                     serving={"maxServices": 10, "replicas": {"min": 2, "max": 3}, "batchWaitMs": 2}))
    st = run.spec.storage
    a = serving.app_args(run.spec.serving, "s3://b/runs/r/student-crsd/model", "onnx", st.endpoint, st.region)
    assert (a.model, a.runtime, a.max_services, a.replicas.min, a.replicas.max, a.batch_wait_ms) == (
        "s3://b/runs/r/student-crsd/model", "onnx", 10, 2, 3, 2)
    assert a.storage_endpoint == "http://s3:9000"
    again = serving.AppArgs.model_validate(a.model_dump(by_alias=True))  # round trip as serveConfigV2 args
    assert again == a


def test_bad_app_args_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="serving args: maxServices"):
        serving.build_app({"model": str(tmp_path), "maxServices": 0})
    with pytest.raises(ValueError, match="serving args: model"):
        serving.build_app({})


def test_a_missing_artifact_fails_before_any_replica_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model: no student artifact at .*student.json missing"):
        serving.build_app({"model": str(tmp_path / "nope")})


def test_the_batch_must_hold_a_whole_request():
    with pytest.raises(spec.SpecError, match=r"spec.serving.maxBatchPairs: must be >= maxServices \(100\)"):
        spec.parse_run(minimal_doc(serving={"maxBatchPairs": 50}))


def test_port_free(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not serving.port_free("127.0.0.1", s.getsockname()[1])
    assert serving.port_free("127.0.0.1", 0)


def _held_out() -> list[dict]:
    """A knowledge world's eval pairs: free-text services, as a run's data stage writes them."""
    from kubedistill.stages import world

    return world.generate(["irrelevant", "partial", "relevant"], 60, 30, 6, 10, 60, seed=0).eval


def test_the_example_request_is_a_held_out_query_of_the_run_and_its_curl_is_valid():
    from kubedistill.stages.data import service_text

    labels = ["irrelevant", "partial", "relevant"]
    rows = _held_out()
    body, truth = serving.example_request(rows, labels)
    first = next(r for r in rows if r["query"] == body["query"])  # the first query with a relevant candidate
    assert truth[0] == "relevant" and len(set(truth)) == len(truth) > 1  # one per label, most relevant first
    held_out = {(r["query"], service_text(r)): r["label"] for r in rows}
    assert [held_out[(body["query"], s["text"])] for s in body["services"]] == truth
    assert rows.index(first) <= min(rows.index(r) for r in rows if r["label"] == "relevant")
    cmd = serving.curl_example("http://127.0.0.1:8000/score", body)
    assert shlex.split(cmd)[:4] == ["curl", "-s", "-X", "POST"]
    assert _parse(json.loads(shlex.split(cmd)[-1]), max_services=10, max_chars=2000).services[0].id == "s1"
    answer = {"labels": labels, "results": [{"id": s["id"], "label": "partial", "score": 0.5} for s in body["services"]]}
    lines = serving.answer_lines(body, truth, answer)
    assert lines[0] == f"s1 partial    (score 0.50; true label relevant): {body['services'][0]['text']}"
    # data without such a query (your own eval set may grade one candidate per query): its first query
    plain = [r for r in rows if r["label"] != "relevant"]
    body, truth = serving.example_request(plain, labels)
    graded = {r["label"] for r in plain if r["query"] == plain[0]["query"]}
    assert body["query"] == plain[0]["query"] and truth == [lab for lab in reversed(labels) if lab in graded]
    with pytest.raises(ValueError, match="no held-out pairs"):
        serving.example_request([], labels)


RERANK = {"query": "vegan brunch", "documents": ["Green Fork | vegan brunch", {"text": "Iron Gym", "id": "g1"}, "Cafe"]}


@pytest.mark.parametrize(("doc", "status", "field", "says"), [
    ({"query": "q", "documents": []}, 422, "documents", "at least 1 item"),
    ({"query": "q", "documents": [{"title": "no text"}]}, 422, "documents[0].text", "Field required"),
    ({"query": "q", "documents": [7]}, 422, "documents[0]", "expected a string, or an object with a 'text'"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 422, "top_n", "greater than or equal to 1"),
    ({"query": "q", "documents": ["d"], "rank_fields": ["title"]}, 422, "rank_fields", "unknown field"),
    ({"query": "q", "documents": ["d"] * 9}, 413, "documents", "at most 8 per request, got 9"),
    ({"query": "q", "documents": ["d" * 201]}, 422, "documents[0]", "longer than 200 characters"),
    ({"query": "q", "documents": [{"text": "d" * 201}]}, 422, "documents[0].text", "longer than 200 characters"),
    ({"query": "q" * 201, "documents": ["d"]}, 422, "query", "longer than 200 characters"),
    ([RERANK], 422, "body", "expected a JSON object with 'query' and 'documents'"),
])
def test_bad_rerank_requests_name_the_field(doc, status, field, says):
    with pytest.raises(RequestError) as e:
        serving.parse_rerank(json.dumps(doc).encode(), 8, 200)
    assert (e.value.status, e.value.field) == (status, field) and says in e.value.message


class _Student:
    version, labels = "crsd-1+onnx", ["irrelevant", "partial", "relevant"]


def test_rerank_orders_best_first_ties_in_request_order_with_top_n_and_documents():
    req = serving.parse_rerank(json.dumps({**RERANK, "top_n": 2, "return_documents": True, "model": "any"}).encode(), 8, 200)
    probs = np.array([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 0.5, 0.5]])  # grades 0.75, 1.0, 0.75
    body = serving.rerank_body(req, probs, _Student())
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [(1, 1.0), (0, 0.75)]
    assert [r["document"] for r in body["results"]] == [{"text": "Iron Gym", "id": "g1"}, {"text": "Green Fork | vegan brunch"}]
    assert body["modelVersion"] == "crsd-1+onnx" and len(body["id"]) == 36
    plain = serving.rerank_body(serving.parse_rerank(json.dumps(RERANK).encode(), 8, 200), probs, _Student())
    assert [r["index"] for r in plain["results"]] == [1, 0, 2] and all("document" not in r for r in plain["results"])
    # relevance_score is /score's score for the same probabilities
    scored = score_results(probs, _Student.labels, ["a", "b", "c"])
    assert sorted(r["relevance_score"] for r in plain["results"]) == sorted(r["score"] for r in scored)


def test_the_committed_openapi_document_is_the_apps_and_covers_every_route():
    from pathlib import Path

    committed = json.loads((Path(__file__).parents[2] / "ray_apps" / "student.openapi.json").read_text())
    doc = serving.openapi_document()
    assert committed == doc, "ray_apps/student.openapi.json is stale: run `make docs`"
    routes = {(m.lower(), r.path) for r in serving.fastapi_app().routes for m in getattr(r, "methods", ())}
    assert routes == {(m, p) for p, ops in doc["paths"].items() for m in ops}


def test_requests_and_answers_validate_against_the_openapi_schemas():
    import jsonschema

    doc = serving.openapi_document()

    def check(instance, name):
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.Draft202012Validator(schema).validate(instance)

    check(RERANK, "RerankRequest")
    check(serving.example_request(_held_out(), ["irrelevant", "partial", "relevant"])[0], "ScoreRequest")
    req = serving.parse_rerank(json.dumps({**RERANK, "return_documents": True}).encode(), 8, 200)
    check(serving.rerank_body(req, np.full((3, 3), 1 / 3), _Student()), "RerankResponse")
    check({"modelVersion": "v", "labels": _Student.labels,
           "results": score_results(np.full((1, 3), 1 / 3), _Student.labels, ["a"])}, "ScoreResponse")
    with pytest.raises(RequestError) as e:
        serving.parse_rerank(b"{}", 8, 200)
    check(e.value.body(), "ErrorBody")
    with pytest.raises(jsonschema.ValidationError):
        check({"query": "q"}, "RerankRequest")
