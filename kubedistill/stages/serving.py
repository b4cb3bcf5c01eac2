"""Serving the student: request validation, scoring, the Ray Serve application and the `serve` stage.

The application (`ray_apps/student.py` → `build_app`) loads an exported student (local directory or
s3:// prefix) and answers

    POST /score   {"query": str, "services": [{"id": str, "text": str, ...}, ...]}
      200 → {"modelVersion": str, "labels": [...], "results": [{"id", "label", "probabilities", "score"}]}
      4xx → {"error": "<field>: <what was expected>", "field": "<field>", "errors": [...]}
      413 body over `maxBodyBytes` (from Content-Length before reading, or while reading); 400 invalid JSON or
      nested deeper than the request's shape allows; 422 a field (ids at most 256 characters, text that is
      not valid Unicode); 503 + Retry-After when the replica holds `maxQueuedRequests`; 504 after
      `requestTimeoutSeconds`. A request that fails in the model fails alone: its batch is scored again
      request by request, and only the failing one answers 500.
    POST /rerank  {"query": str, "documents": [str | {"text": str, ...}], "top_n"?: int, "return_documents"?: bool}
      200 → {"id": str, "results": [{"index", "relevance_score", "document"?}], "modelVersion": str}, best first:
      Cohere's rerank shape (also /v1/rerank and /v2/rerank, where its SDK sends), which LangChain, LlamaIndex
      and Haystack speak; `relevance_score` is /score's `score`; the same limits and errors as /score
    GET  /openapi.json  the OpenAPI document of these routes (committed as ray_apps/student.openapi.json)
    GET  /healthz  200 while the replica runs
    GET  /readyz   200 once a model is loaded, 503 before

`score` is the expected relevance grade in [0, 1] (least relevant label = 0, most relevant = 1), the
number a search ranker sorts by. The probabilities carry the model's fitted temperature and `label` its
decision offsets (`spec.student.calibration`, stored in student.json). A service's `text` is the same service text the student trained on
(`kubedistill.stages.data.service_text`: title | category | district | price | offers tags | description).

Concurrent requests are batched (`@serve.batch`, counted in pairs up to `maxBatchPairs`); with
`batchWaitMs: 0` a batch is whatever queued while the model was busy, so a lone request waits for
nothing. The model path is the deployment's `user_config`, so switching versions reloads the model
inside the running replicas (`reconfigure`) without dropping requests. So is the runtime (`torch`, `onnx`,
`onnx-int8`: `spec.serving.runtime`, resolved by the pipeline); the served `modelVersion` names it
(`crsd-<version>+onnx-int8`).
"""

import asyncio
import json
import shlex
import socket
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the route signatures' annotations here
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from kubedistill.core.pipeline import promoted
from kubedistill.core.serve_app import APP_NAME, AppArgs, app_args
from kubedistill.core.spec import field_path
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import Storage
from kubedistill.ml import calibration

DEPLOYMENT = "StudentScorer"
#: the student app's own metrics (ray.serve.metrics): Ray exports each as `ray_<name>` (a counter `..._total`,
#: a histogram `..._bucket`/`_sum`/`_count`), beside Serve's own; the chart's dashboard and alerts read them
APP_METRICS = {
    "kubedistill_score_requests": "counter",
    "kubedistill_scored_pairs": "counter",
    "kubedistill_batch_pairs": "histogram",
    "kubedistill_model_latency_ms": "histogram",
}


# ---------------------------------------------------------------------------------------------
# Requests and responses (pure)


#: longest service id accepted (ids are echoed back in the response)
MAX_ID_CHARS = 256
#: deepest JSON nesting a /score body needs: body → services → service → a nested extra field or two
MAX_DEPTH = 6


class RequestError(Exception):
    """A request the app refuses: HTTP `status`, the offending `field`, and what was expected."""

    def __init__(
        self,
        status: int,
        field: str,
        message: str,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message
        self.errors = errors or [{"field": field, "message": message}]
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field, "errors": self.errors}


# pydantic refuses a str holding a lone surrogate (a JSON "\ud800" escape) as "unable to parse raw data as a
# unicode string": a 422 naming the field, before the request can reach the tokenizer or its batch
class ScoreService(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str = Field(min_length=1)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    services: list[ScoreService] = Field(min_length=1)

    def pairs(self) -> tuple[str, list[str]]:
        return self.query, [s.text for s in self.services]

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text the request carries: what `maxTextChars` bounds."""
        return [("query", self.query), *((f"services[{i}].text", s.text) for i, s in enumerate(self.services))]


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str = Field(min_length=1)


def _document_kind(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "object" if isinstance(value, dict) else None


#: a rerank document: a string, or an object with a `text` (error locations name the document, not the branch)
Document = Annotated[
    Annotated[str, Tag("text")] | Annotated[RerankDocument, Tag("object")],
    Discriminator(
        _document_kind,
        custom_error_type="document",
        custom_error_message="expected a string, or an object with a 'text'",
    ),
]
_BRANCHES = ("text", "object")


class RerankRequest(BaseModel):
    """POST /rerank: the shape of Cohere's rerank API (also Jina's and Text Embeddings Inference's clients')."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    documents: list[Document] = Field(min_length=1, description="Texts, or objects with a `text`.")
    top_n: int | None = Field(default=None, ge=1, description="Return the best `top_n` (default: all).")
    return_documents: bool = Field(default=False, description="Echo each document in its result.")
    model: str | None = Field(
        default=None, max_length=256, description="Accepted for clients that name one; this server scores with its own."
    )

    def pairs(self) -> tuple[str, list[str]]:
        return self.query, [d if isinstance(d, str) else d.text for d in self.documents]

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text the request carries: what `maxTextChars` bounds."""
        return [("query", self.query)] + [
            (f"documents[{i}]", d) if isinstance(d, str) else (f"documents[{i}].text", d.text)
            for i, d in enumerate(self.documents)
        ]


class ScoreResult(BaseModel):
    id: str
    label: str
    probabilities: dict[str, float]
    score: float = Field(description="Expected relevance grade in [0, 1]: least relevant label 0, most relevant 1.")


class ScoreResponse(BaseModel):
    modelVersion: str
    labels: list[str]
    results: list[ScoreResult]


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="The expected relevance grade in [0, 1], as /score's `score`.")
    document: dict[str, Any] | None = Field(default=None, description="With return_documents: the document.")


class RerankResponse(BaseModel):
    id: str
    results: list[RerankResult] = Field(description="Best first.")
    modelVersion: str


class ErrorItem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str = Field(description="`<field>: <what was expected>` of the first error.")
    field: str
    errors: list[ErrorItem]


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette request, refused with 413 once it is over `limit` bytes: judged from
    Content-Length before anything is read, and while reading (a missing or false length gains nothing)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length", f"not a number ({declared[:40]!r})") from None
        if size > limit:
            raise RequestError(413, "body", f"at most {limit} bytes, Content-Length says {size}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, "body", f"at most {limit} bytes; stopped reading after {total}")
        chunks.append(chunk)
    return b"".join(chunks)


def _depth(doc: Any) -> int:
    """How deeply `doc` nests lists and objects (iteratively: no recursion on hostile input)."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, d = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _decode(body: bytes, expected: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, "body", f"not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "body", f"nested deeper than {MAX_DEPTH} levels") from None
    if _depth(doc) > MAX_DEPTH:
        raise RequestError(400, "body", f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(doc, dict):
        raise RequestError(422, "body", f"expected a JSON object with {expected}, got {type(doc).__name__}")
    return doc


_Request = TypeVar("_Request", ScoreRequest, RerankRequest)


def _parse(body: bytes, model: type[_Request], items: str, max_items: int, max_text_chars: int) -> _Request:
    """Decode and check a body of `model`, whose list `items` holds at most `max_items`; raise RequestError
    naming the first bad field (all of them in `errors`)."""
    doc = _decode(body, f"'query' and '{items}'")
    if isinstance(doc.get(items), list) and len(doc[items]) > max_items:
        raise RequestError(413, items, f"at most {max_items} per request, got {len(doc[items])}")
    try:
        req = model.model_validate(doc)
    except ValidationError as e:
        errors = []
        for err in e.errors(include_url=False):
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            at = err["loc"]  # without the tag of a document's branch: documents[0].text, not documents[0].object.text
            loc = tuple(p for i, p in enumerate(at) if not (p in _BRANCHES and i >= 2 and at[i - 2] == "documents"))
            errors.append({"field": field_path(loc, "body"), "message": msg})
        raise RequestError(422, errors[0]["field"], errors[0]["message"], errors) from None
    too_long = [(f, len(t)) for f, t in req.texts() if len(t) > max_text_chars]
    if too_long:
        errors = [{"field": f, "message": f"longer than {max_text_chars} characters (got {n})"} for f, n in too_long]
        raise RequestError(422, errors[0]["field"], errors[0]["message"], errors)
    return req


def parse_request(body: bytes, max_services: int, max_text_chars: int) -> ScoreRequest:
    """Decode and check a /score body; raise RequestError naming the first bad field (all of them in `errors`)."""
    return _parse(body, ScoreRequest, "services", max_services, max_text_chars)


def parse_rerank(body: bytes, max_documents: int, max_text_chars: int) -> RerankRequest:
    """Decode and check a /rerank body, with /score's limits (`maxServices` documents, `maxTextChars` each)."""
    return _parse(body, RerankRequest, "documents", max_documents, max_text_chars)


class Admission:
    """A replica's own bound: at most `limit` requests held at once (scoring or waiting for the model); one more
    is refused with 503 and Retry-After. Ray Serve bounds the queue in front of the replicas with the same
    number (`max_queued_requests`) and holds at most `maxOngoingRequests` in a replica; this guard is what
    still holds when a replica is handed more than the queue's bound (maxOngoingRequests above it)."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        self.limit, self.retry_after_s, self.held = limit, retry_after_s, 0

    def __enter__(self) -> "Admission":
        if self.held >= self.limit:
            raise RequestError(
                503,
                "server",
                f"busy: {self.held} requests queued on this replica (at most {self.limit}); retry shortly",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.held += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.held -= 1


class ItemFailed:
    """The result slot of one request whose pairs the model could not score (the others' slots are scores)."""

    def __init__(self, error: BaseException):
        self.error = error


def score_each(items: list[tuple[str, list[str]]], predict: Any) -> list[Any]:
    """Score a batch of requests with one model call; if that call fails, score each request alone, so a
    request that breaks the model fails by itself (`ItemFailed` in its slot) and never its neighbours."""
    try:
        probs = predict([q for q, ts in items for _ in ts], [t for _, ts in items for t in ts])
    except Exception:  # noqa: BLE001 - find the request at fault below
        out: list[Any] = []
        for q, ts in items:
            try:
                out.append(predict([q] * len(ts), ts))
            except Exception as e:  # noqa: BLE001 - reported as this request's 500
                out.append(ItemFailed(e))
        return out
    out, i = [], 0
    for _, ts in items:
        out.append(probs[i : i + len(ts)])
        i += len(ts)
    return out


def score_body(req: ScoreRequest, probs: np.ndarray, student: Any) -> dict[str, Any]:
    return {
        "modelVersion": student.version,
        "labels": student.labels,
        "results": score_results(probs, student.labels, [s.id for s in req.services], student.offsets),
    }


def rerank_body(req: RerankRequest, probs: np.ndarray, student: Any) -> dict[str, Any]:
    """Documents best first by relevance_score (/score's `score`), ties in request order; `top_n` of them."""
    scores = expected_grades(probs)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: req.top_n]
    results = []
    for i in order:
        r: dict[str, Any] = {"index": i, "relevance_score": round(float(scores[i]), 6)}
        if req.return_documents:
            d = req.documents[i]
            r["document"] = {"text": d} if isinstance(d, str) else d.model_dump()
        results.append(r)
    return {"id": str(uuid.uuid4()), "results": results, "modelVersion": student.version}


#: route -> (parse the body with the app's limits, answer from the scored probabilities)
ENDPOINTS: dict[str, tuple[Any, Any]] = {
    "/score": (parse_request, score_body),
    "/rerank": (parse_rerank, rerank_body),
}


async def answer(
    request: Any, args: AppArgs, admission: Admission, score: Any, route: str = "/score"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of one POST to `route` (/score or /rerank): bounded read, parse, admission,
    scoring within the timeout. `score(query, texts)` awaits the batched model and returns (probabilities, the
    model that scored them)."""
    parse, respond = ENDPOINTS[route]
    try:
        with admission:
            req = parse(await read_body(request, args.max_body_bytes), args.max_services, args.max_text_chars)
            try:
                probs, student = await asyncio.wait_for(score(*req.pairs()), args.request_timeout_seconds)
            except TimeoutError:
                raise RequestError(504, "server", f"not scored within {args.request_timeout_seconds} s") from None
    except RequestError as e:
        return e.status, e.body(), e.headers
    return 200, respond(req, probs, student), {"X-Model-Version": student.version}


def score_results(
    probs: np.ndarray, labels: list[str], ids: list[str], offsets: list[float] | None = None
) -> list[dict[str, Any]]:
    """Per service: the label (the argmax, or argmax(log p + offsets) with the model's decision offsets),
    every class probability (calibrated by the model's temperature) and the expected grade in [0, 1]."""
    decided = calibration.decide(probs, offsets)
    return [
        {
            "id": i,
            "label": labels[int(k)],
            "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, p, strict=True)},
            "score": round(float(g), 6),
        }
        for i, p, k, g in zip(ids, probs, decided, expected_grades(probs), strict=True)
    ]


def expected_grades(probs: np.ndarray) -> np.ndarray:
    """Each row's expected relevance grade: labels graded 0 (least relevant) to 1 (most), weighted by probability."""
    return np.asarray(probs, dtype=np.float64) @ np.linspace(0.0, 1.0, probs.shape[1])


# ---------------------------------------------------------------------------------------------
# The OpenAPI document (served at /openapi.json; a copy is committed as ray_apps/student.openapi.json)


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 of the app's routes, their bodies and error answers, from the request and response models."""
    from pydantic.json_schema import models_json_schema

    from kubedistill import __version__

    models: list[tuple[type[BaseModel], Any]] = [
        (ScoreRequest, "validation"),
        (RerankRequest, "validation"),
        (ScoreResponse, "serialization"),
        (RerankResponse, "serialization"),
        (ErrorBody, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")

    def body(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    errors = {
        "400": "Not JSON, or nested deeper than the request's shape allows",
        "413": "Body over maxBodyBytes, or more services/documents than maxServices",
        "422": "A field that is missing, of the wrong type, or over maxTextChars",
        "500": "The model failed on this request (its batch neighbours are unaffected)",
        "503": "Busy (maxQueuedRequests held; see Retry-After) or no model loaded yet",
        "504": "Not scored within requestTimeoutSeconds",
    }

    def post(summary: str, request: str, response: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, **body(request)},
                "responses": {
                    "200": {"description": "Scored", **body(response)},
                    **{code: {"description": text, **body("ErrorBody")} for code, text in errors.items()},
                },
            }
        }

    rerank = post(
        "Order documents by relevance to the query (Cohere's rerank shape; also served at /v1/rerank and "
        "/v2/rerank for clients that add their API version)",
        "RerankRequest",
        "RerankResponse",
    )
    status = {"200": {"description": "OK"}, "503": {"description": "Not ready"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kubedistill student", "version": __version__},
        "paths": {
            "/score": post("Score (query, service) pairs", "ScoreRequest", "ScoreResponse"),
            "/rerank": rerank,
            "/v1/rerank": rerank,
            "/v2/rerank": rerank,
            "/healthz": {"get": {"summary": "The replica runs", "responses": {"200": {"description": "OK"}}}},
            "/readyz": {"get": {"summary": "A model is loaded", "responses": status}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}},
        },
        "components": {"schemas": top["$defs"]},
    }


# ---------------------------------------------------------------------------------------------
# The Ray Serve application


def check_artifact(args: AppArgs) -> None:
    """Fail before any replica starts when the model is not there (a clear error, not a restart loop)."""
    from kubedistill.stages.student import ARTIFACT_VERSION

    st = Storage(args.model, args.s3())
    try:
        present = {f: st.is_file(f) for f in ("student.json", "head.safetensors", "encoder/config.json")}
        meta = st.read_json("student.json") if present["student.json"] else {}
    except Exception as e:  # noqa: BLE001 - unreachable S3, bad credentials, a corrupt student.json: say which field and why
        raise FileNotFoundError(f"model: cannot read the student artifact at {args.model}: {e}") from None
    if not present["student.json"]:
        raise FileNotFoundError(
            f"model: no student artifact at {args.model} (student.json missing); point it at the student-crsd "
            "stage's outputs.model"
        )
    missing = [f for f, ok in present.items() if not ok]
    if missing:
        raise FileNotFoundError(
            f"model: the student artifact at {args.model} is incomplete: {', '.join(missing)} missing"
        )
    if meta.get("artifactVersion") != ARTIFACT_VERSION:
        raise ValueError(
            f"model: artifact version {meta.get('artifactVersion')} at {args.model} is not supported "
            f"(want {ARTIFACT_VERSION})"
        )
    if args.runtime != "torch":
        from kubedistill.ml.export import ONNX_FILES

        export = (meta.get("exports") or {}).get(args.runtime)
        if export is None or not st.is_file(f"onnx/{ONNX_FILES[args.runtime]}"):
            raise FileNotFoundError(
                f"runtime: {args.runtime} needs the student's ONNX export, which the artifact at {args.model} "
                "lacks (a student exported before ONNX exports); serve it with runtime torch"
            )


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder (`import_path: ray_apps.student:app`, `args:` the AppArgs)."""
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    try:
        a = AppArgs.model_validate(args)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise ValueError(f"serving args: {field_path(first['loc'])}: {first['msg']}") from None
    check_artifact(a)
    deployment = _deployment()
    # the model and its runtime are user_config: switching either reloads in place
    static = a.model_dump(by_alias=True, exclude={"model", "runtime"})
    return deployment.options(
        max_ongoing_requests=a.max_ongoing_requests,
        # the queue's bound where requests wait for a replica: Ray Serve answers 503 + Retry-After beyond it
        max_queued_requests=a.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        autoscaling_config=AutoscalingConfig(
            min_replicas=a.replicas.min, max_replicas=a.replicas.max, target_ongoing_requests=a.target_ongoing_requests
        ),
        ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_replica},
        user_config={"model": a.model, "runtime": a.runtime},
        health_check_period_s=10,
    ).bind(static)


_DEPLOYMENT: Any = None
_API: Any = None


def fastapi_app() -> Any:
    """The app's FastAPI router (its routes), as the deployment class declares them."""
    _deployment()
    return _API


def _deployment() -> Any:
    """The deployment class, defined on first use so importing this module needs no Ray Serve."""
    global _DEPLOYMENT, _API
    if _DEPLOYMENT is not None:
        return _DEPLOYMENT
    import torch
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.metrics import Counter, Histogram

    from kubedistill.stages.student import load_runtime

    api = FastAPI(title="kubedistill student", description=__doc__, openapi_url=None, docs_url=None, redoc_url=None)

    @serve.deployment(name=DEPLOYMENT)
    @serve.ingress(api)
    class StudentScorer:
        def __init__(self, static: dict[str, Any]):
            self.args = AppArgs.model_validate({**static, "model": "-"})
            torch.set_num_threads(max(1, int(self.args.cpus_per_replica)))
            self.device = "cuda" if self.args.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
            self.student: Any = None
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
            self.admission = Admission(self.args.max_queued_requests)
            self._score_batch.set_max_batch_size(self.args.max_batch_pairs)
            self._score_batch.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000)
            self.requests = Counter(
                "kubedistill_score_requests",  # APP_METRICS names each of them
                "POST /score and /rerank requests by HTTP status",
                tag_keys=("status", "route"),
            )
            self.pairs = Counter("kubedistill_scored_pairs", "(query, service) pairs scored")
            self.batch_pairs = Histogram(
                "kubedistill_batch_pairs",
                "pairs per model call",
                boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000],
            )
            self.model_ms = Histogram(
                "kubedistill_model_latency_ms",
                "model call time per batch (ms)",
                boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            )

        async def reconfigure(self, user_config: dict[str, Any]) -> None:
            uri, runtime = user_config["model"], user_config.get("runtime", "torch")
            # not self.pool: the current model keeps scoring while the next one loads
            student = await asyncio.get_running_loop().run_in_executor(None, self._load, uri, runtime)
            self.student = student  # requests already batched finish on the old model; new ones get this

        def _load(self, uri: str, runtime: str) -> Any:
            threads = max(1, int(self.args.cpus_per_replica))
            s = load_runtime(uri, runtime, self.args.s3(), threads)
            if runtime == "torch":
                s.model.to(self.device)
            s.predict_texts(["warm up"], ["warm up"])  # first call allocates; keep it out of a user's latency
            return s

        def check_health(self) -> None:
            if self.student is None:
                raise RuntimeError("no model loaded")

        @api.get("/healthz")
        def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/readyz")
        def readyz(self) -> JSONResponse:
            if self.student is None:
                return JSONResponse({"ready": False, "reason": "model not loaded"}, status_code=503)
            return JSONResponse({"ready": True, "modelVersion": self.student.version})

        @api.get("/openapi.json")
        def openapi(self) -> dict[str, Any]:
            return openapi_document()

        @api.post("/score")
        async def score(self, request: Request) -> JSONResponse:
            return await self._answer(request, "/score")

        @api.post("/rerank")
        @api.post("/v1/rerank")  # where Cohere's SDK (base_url = this server) sends its v1 and v2 rerank calls
        @api.post("/v2/rerank")
        async def rerank(self, request: Request) -> JSONResponse:
            return await self._answer(request, "/rerank")

        async def _answer(self, request: Request, route: str) -> JSONResponse:
            status, body, headers = await answer(request, self.args, self.admission, self._score_one, route)
            self.requests.inc(tags={"status": str(status), "route": route})
            return JSONResponse(body, status_code=status, headers=headers)

        async def _score_one(self, query: str, texts: list[str]) -> tuple[np.ndarray, Any]:
            probs, student = await self._score_batch((query, texts))
            if isinstance(probs, ItemFailed):
                raise RequestError(500, "model", f"scoring failed: {probs.error}")
            return probs, student

        @serve.batch(
            max_batch_size=512, batch_wait_timeout_s=0.0, batch_size_fn=lambda items: sum(len(i[1]) for i in items)
        )
        async def _score_batch(self, items: list[tuple[str, list[str]]]) -> list[tuple[np.ndarray, Any]]:
            student = self.student
            if student is None:
                raise RequestError(503, "model", "not loaded yet")
            pairs = sum(len(ts) for _, ts in items)
            t0 = time.perf_counter()
            results = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: score_each(items, lambda q, t: student.predict_texts(q, t, batch_size=len(t)))
            )
            self.model_ms.observe((time.perf_counter() - t0) * 1000)
            self.batch_pairs.observe(pairs)
            self.pairs.inc(pairs)
            return [(r, student) for r in results]

    _DEPLOYMENT, _API = StudentScorer, api
    return StudentScorer


# ---------------------------------------------------------------------------------------------
# Local deployment and the `serve` stage


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def deploy(args: AppArgs, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> str:
    """Deploy (or update in place) the app on the connected Ray cluster; return its /score URL."""
    from ray import serve

    if not serve.status().proxies and not port_free(host, port):
        raise RuntimeError(
            f"port {port} on {host} is busy: stop what uses it, or pick another port "
            "(`kubedistill run --serve-port N`, or KUBEDISTILL_SERVE_PORT)"
        )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args.model_dump(by_alias=True)), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/score"


def post_json(url: str, doc: Any, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """POST JSON, return (status, decoded body) for 2xx and 4xx/5xx alike."""
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def example_request(rows: list[dict[str, Any]], labels: list[str], size: int = 3) -> tuple[dict[str, Any], list[str]]:
    """A /score request made of the run's own held-out data, and the true label of each service in it: the
    first query with a candidate of the most relevant label and one of another (else the first query), with
    up to `size` of its candidates (one per label, most relevant first) as the standard input has them. A
    pair of the run's own world, so the answer shown is one its eval set scores."""
    from kubedistill.stages.data import service_text

    if not rows:
        raise ValueError("no held-out pairs to make an example request of")
    by_query: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_query.setdefault(r["query"], {}).setdefault(r["label"], r)
    query, one_per_label = next(
        ((q, c) for q, c in by_query.items() if labels[-1] in c and len(c) > 1), next(iter(by_query.items()))
    )
    picked = [one_per_label[lab] for lab in reversed(labels) if lab in one_per_label][:size]
    services = [{"id": f"s{i}", "text": service_text(r)} for i, r in enumerate(picked, 1)]
    return {"query": query, "services": services}, [r["label"] for r in picked]


def curl_example(url: str, body: dict[str, Any]) -> str:
    return f"curl -s -X POST {url} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"


def answer_lines(body: dict[str, Any], truth: list[str], answer: dict[str, Any]) -> list[str]:
    """The served answer to `example_request`'s request, one line per service beside its true label."""
    texts = {s["id"]: s["text"] for s in body["services"]}
    width = max(map(len, answer["labels"]))
    return [
        f"{r['id']} {r['label']:<{width}} (score {r['score']:.2f}; true label {t}): {texts[r['id']]}"
        for r, t in zip(answer["results"], truth, strict=True)
    ]


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Deploy the student on this Ray cluster, check one request end to end, record the URL and version."""
    import os

    import ray

    s = ctx.spec.serving  # the version evaluate scored, its gate passed; the runtime its checks allow
    served = promoted(ctx.input_manifest, s.runtime, s.gpus_per_replica > 0)
    if served is None:
        raise RuntimeError("no student model to serve: neither evaluate nor student-crsd names one in its outputs")
    st = ctx.config["storage"]
    args = app_args(s, served.model, served.runtime, st.get("endpoint"), st.get("region"))
    ray.init(address="auto", log_to_driver=False, logging_level="WARNING")
    host = os.environ.get("KUBEDISTILL_SERVE_HOST", "127.0.0.1")
    port = int(os.environ.get("KUBEDISTILL_SERVE_PORT", "8000"))
    url = deploy(args, host, port)
    t0 = time.perf_counter()
    status, body = post_json(url, {"query": "health check", "services": [{"id": "probe", "text": "probe"}]})
    if status != 200:
        raise RuntimeError(f"the deployed app answered {status} to a probe request: {body}")
    ctx.log(f"serving {body['modelVersion']} at {url}")
    return {
        "metrics": {"probeLatencyMs": round((time.perf_counter() - t0) * 1000, 1)},
        "outputs": {"url": url, "modelVersion": body["modelVersion"], "model": served.model, "runtime": served.runtime},
    }
