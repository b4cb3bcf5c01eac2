"""A bounded HTTP load generator for `/score`: `concurrency` clients, each sending the next request
as soon as its last one answered, for a fixed time or a fixed number of requests.

Used by `benchmarks/serve_latency.py` and the serving load test; point it only at loopback or at a
deployment you own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LoadReport:
    concurrency: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)  # 0: no HTTP answer (connection error, timeout)
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)  # 200 answers by the modelVersion they name

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        """5xx answers plus requests that got no answer at all."""
        return sum(n for s, n in self.statuses.items() if s >= 500 or s == 0)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self, pairs_per_request: int = 1) -> dict[str, Any]:
        ok = self.statuses.get(200, 0)
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "seconds": round(self.seconds, 2),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "requests_per_s": round(ok / self.seconds, 1) if self.seconds else 0.0,
            "pairs_per_s": round(ok * pairs_per_request / self.seconds, 1) if self.seconds else 0.0,
            "errors": dict(self.errors.most_common(5)),
        }


def run_load(
    url: str,
    body: dict[str, Any],
    concurrency: int,
    *,
    duration_s: float | None = None,
    requests: int | None = None,
    timeout_s: float = 30.0,
    stop: threading.Event | None = None,
    report: LoadReport | None = None,
) -> LoadReport:
    """POST `body` to `url` from `concurrency` clients until `duration_s` passed or `requests` were sent,
    or earlier once `stop` is set. Pass `report` to watch the counts while the load runs."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    report = report or LoadReport(concurrency, 0.0)
    report.concurrency = concurrency
    return asyncio.run(_load(url, json.dumps(body).encode(), report, duration_s, requests, timeout_s, stop))


async def _load(
    url: str,
    payload: bytes,
    report: LoadReport,
    duration_s: float | None,
    requests: int | None,
    timeout_s: float,
    stop: threading.Event | None,
) -> LoadReport:
    import aiohttp

    concurrency = report.concurrency
    left = [requests if requests is not None else -1]
    stop_at = time.monotonic() + duration_s if duration_s is not None else float("inf")

    def take() -> bool:
        if time.monotonic() >= stop_at or (stop is not None and stop.is_set()):
            return False
        if left[0] == 0:
            return False
        left[0] -= 1
        return True

    async def client(session: aiohttp.ClientSession) -> None:
        while take():
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as r:
                    answer = await r.read()
                    report.statuses[r.status] += 1
                    if r.status == 200:
                        report.latencies_ms.append((time.perf_counter() - t0) * 1000)
                        report.versions[_model_version(answer)] += 1
            except (TimeoutError, aiohttp.ClientError) as e:
                report.statuses[0] += 1
                report.errors[type(e).__name__] += 1

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        report.seconds = time.monotonic() - t0
    return report


def _model_version(answer: bytes) -> str:
    try:
        return str(json.loads(answer).get("modelVersion", ""))
    except (ValueError, AttributeError):
        return ""
