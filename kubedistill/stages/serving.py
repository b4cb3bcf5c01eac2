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
    GET  /healthz  200 while the replica runs
    GET  /readyz   200 once a model is loaded, 503 before

`score` is the expected relevance grade in [0, 1] (least relevant label = 0, most relevant = 1), the
number a search ranker sorts by. The probabilities carry the model's fitted temperature and `label` its
decision offsets (`spec.student.calibration`, stored in student.json). A service's `text` is the same service text the student trained on
(`kubedistill.stages.data.service_text`: title | category | district | price | offers tags | description).

Concurrent requests are batched (`@serve.batch`, counted in pairs up to `maxBatchPairs`); with
`batchWaitMs: 0` a batch is whatever queued while the model was busy, so a lone request waits for
nothing. The model path is the deployment's `user_config`, so switching versions reloads the model
inside the running replicas (`reconfigure`) without dropping requests.
"""

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the route signatures' annotations here
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubedistill.core.pipeline import promoted_model
from kubedistill.core.serve_app import APP_NAME, AppArgs, app_args
from kubedistill.core.spec import field_path
from kubedistill.core.stage import StageContext
from kubedistill.core.storage import Storage
from kubedistill.ml import calibration

DEPLOYMENT = "StudentScorer"


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


def parse_request(body: bytes, max_services: int, max_text_chars: int) -> ScoreRequest:
    """Decode and check a /score body; raise RequestError naming the first bad field (all of them in `errors`)."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, "body", f"not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "body", f"nested deeper than {MAX_DEPTH} levels") from None
    if _depth(doc) > MAX_DEPTH:
        raise RequestError(400, "body", f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(doc, dict):
        raise RequestError(422, "body", f"expected a JSON object with 'query' and 'services', got {type(doc).__name__}")
    if isinstance(doc.get("services"), list) and len(doc["services"]) > max_services:
        raise RequestError(413, "services", f"at most {max_services} per request, got {len(doc['services'])}")
    try:
        req = ScoreRequest.model_validate(doc)
    except ValidationError as e:
        errors = []
        for err in e.errors(include_url=False):
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            errors.append({"field": field_path(err["loc"], "body"), "message": msg})
        raise RequestError(422, errors[0]["field"], errors[0]["message"], errors) from None
    too_long = [("query", len(req.query))] if len(req.query) > max_text_chars else []
    too_long += [
        (f"services[{i}].text", len(s.text)) for i, s in enumerate(req.services) if len(s.text) > max_text_chars
    ]
    if too_long:
        errors = [{"field": f, "message": f"longer than {max_text_chars} characters (got {n})"} for f, n in too_long]
        raise RequestError(422, errors[0]["field"], errors[0]["message"], errors)
    return req


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


async def answer(
    request: Any, args: AppArgs, admission: Admission, score: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of one POST /score: bounded read, parse, admission, scoring within the timeout.
    `score(query, texts)` awaits the batched model and returns (probabilities, the model that scored them)."""
    try:
        with admission:
            req = parse_request(await read_body(request, args.max_body_bytes), args.max_services, args.max_text_chars)
            try:
                probs, student = await asyncio.wait_for(
                    score(req.query, [s.text for s in req.services]), args.request_timeout_seconds
                )
            except TimeoutError:
                raise RequestError(504, "server", f"not scored within {args.request_timeout_seconds} s") from None
    except RequestError as e:
        return e.status, e.body(), e.headers
    body = {
        "modelVersion": student.version,
        "labels": student.labels,
        "results": score_results(probs, student.labels, [s.id for s in req.services], student.offsets),
    }
    return 200, body, {"X-Model-Version": student.version}


def score_results(
    probs: np.ndarray, labels: list[str], ids: list[str], offsets: list[float] | None = None
) -> list[dict[str, Any]]:
    """Per service: the label (the argmax, or argmax(log p + offsets) with the model's decision offsets),
    every class probability (calibrated by the model's temperature) and the expected grade in [0, 1]."""
    grades = np.linspace(0.0, 1.0, len(labels))
    decided = calibration.decide(probs, offsets)
    return [
        {
            "id": i,
            "label": labels[int(k)],
            "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, p, strict=True)},
            "score": round(float(p @ grades), 6),
        }
        for i, p, k in zip(ids, probs, decided, strict=True)
    ]


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
    static = a.model_dump(by_alias=True, exclude={"model"})  # the model is user_config: switching it reloads in place
    return deployment.options(
        max_ongoing_requests=a.max_ongoing_requests,
        # the queue's bound where requests wait for a replica: Ray Serve answers 503 + Retry-After beyond it
        max_queued_requests=a.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        autoscaling_config=AutoscalingConfig(
            min_replicas=a.replicas.min, max_replicas=a.replicas.max, target_ongoing_requests=a.target_ongoing_requests
        ),
        ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_replica},
        user_config={"model": a.model},
        health_check_period_s=10,
    ).bind(static)


_DEPLOYMENT: Any = None


def _deployment() -> Any:
    """The deployment class, defined on first use so importing this module needs no Ray Serve."""
    global _DEPLOYMENT
    if _DEPLOYMENT is not None:
        return _DEPLOYMENT
    import torch
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.metrics import Counter, Histogram

    from kubedistill.stages.student import LoadedStudent, load_student

    api = FastAPI(title="kubedistill student", description=__doc__)

    @serve.deployment(name=DEPLOYMENT)
    @serve.ingress(api)
    class StudentScorer:
        def __init__(self, static: dict[str, Any]):
            self.args = AppArgs.model_validate({**static, "model": "-"})
            torch.set_num_threads(max(1, int(self.args.cpus_per_replica)))
            self.device = "cuda" if self.args.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
            self.student: LoadedStudent | None = None
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
            self.admission = Admission(self.args.max_queued_requests)
            self._score_batch.set_max_batch_size(self.args.max_batch_pairs)
            self._score_batch.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000)
            self.requests = Counter(
                "kubedistill_score_requests", "POST /score requests by HTTP status", tag_keys=("status",)
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
            uri = user_config["model"]
            # not self.pool: the current model keeps scoring while the next one loads
            student = await asyncio.get_running_loop().run_in_executor(None, self._load, uri)
            self.student = student  # requests already batched finish on the old model; new ones get this

        def _load(self, uri: str) -> LoadedStudent:
            s = load_student(uri, self.args.s3())
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

        @api.post("/score")
        async def score(self, request: Request) -> JSONResponse:
            status, body, headers = await answer(request, self.args, self.admission, self._score_one)
            self.requests.inc(tags={"status": str(status)})
            return JSONResponse(body, status_code=status, headers=headers)

        async def _score_one(self, query: str, texts: list[str]) -> tuple[np.ndarray, LoadedStudent]:
            probs, student = await self._score_batch((query, texts))
            if isinstance(probs, ItemFailed):
                raise RequestError(500, "model", f"scoring failed: {probs.error}")
            return probs, student

        @serve.batch(
            max_batch_size=512, batch_wait_timeout_s=0.0, batch_size_fn=lambda items: sum(len(i[1]) for i in items)
        )
        async def _score_batch(self, items: list[tuple[str, list[str]]]) -> list[tuple[np.ndarray, LoadedStudent]]:
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

    _DEPLOYMENT = StudentScorer
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


def curl_example(url: str) -> str:
    body = json.dumps(
        {
            "query": "vegan brunch in Old Town",
            "services": [
                {"id": "s1", "text": "Green Fork | restaurant | Old Town | $$ | offers vegan brunch, coffee"},
                {"id": "s2", "text": "Iron Gym | fitness | Harbor | $ | offers weights, sauna"},
            ],
        }
    )
    return f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{body}'"


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """Deploy the student on this Ray cluster, check one request end to end, record the URL and version."""
    import os

    import ray

    model_uri = promoted_model(ctx.input_manifest)  # the version evaluate scored and its gate passed
    if model_uri is None:
        raise RuntimeError("no student model to serve: neither evaluate nor student-crsd names one in its outputs")
    st = ctx.config["storage"]
    args = app_args(ctx.spec.serving, model_uri, st.get("endpoint"), st.get("region"))
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
        "outputs": {"url": url, "modelVersion": body["modelVersion"], "model": model_uri},
    }
