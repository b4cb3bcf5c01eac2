"""A Kubernetes API for the end-to-end tests: kmock's emulator, plus what a real API server adds.

kmock stores objects and serves discovery, CRUD and watch streams. A real API server also stamps
`uid`, `creationTimestamp`, `resourceVersion`, `generation` (bumped on spec changes), names
from `generateName` and a Secret's `stringData` stored as `data`, which the operator relies on (owner references, observedGeneration), and
answers 404 to any request for a resource it does not serve (kmock stores an object of any
resource it is sent: a RayJob created without KubeRay's CRDs would "succeed"); this subclass adds
exactly those.
kmock keeps every request for its own assertions and matches each new one against that history,
which makes a long run quadratic; nothing here reads the history, so a request leaves it when
it has been answered.
It does not emulate label selectors, owner-reference garbage collection or schema validation: the
tests check those properties on the objects themselves.

With `--log-requests FILE` it appends one line per request, `METHOD path?query`, for a benchmark to count
(`benchmarks/operator_scale.py`: the operator's API calls per minute).

Run: python -m tests.e2e.apiserver --port P [--no-kuberay] [--log-requests FILE]   (prints "ready" when listening)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import itertools
import signal
import uuid
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import enums, k8s

_versions = itertools.count(1)


class _ByName(dict):  # type: ignore[type-arg]
    """kmock's store of objects, (resource, namespace, name) → object, also indexed by name."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.names: dict[str, set[Any]] = collections.defaultdict(set)
        for key in self:
            self.names[key[2]].add(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.names[key[2]].add(key)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.names[key[2]].discard(key)

    def clear(self) -> None:
        super().clear()
        self.names.clear()


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator, plus what a real API server adds (above), and two lookups made O(1): kmock derives the
    served resources from every stored object and finds an object by scanning them all, on every request,
    which makes a benchmark with 1,000 runs measure the emulator rather than the operator."""

    log: Any = None  # a text file: one line per request
    _served: list[Any] | None

    def __init__(self) -> None:
        super().__init__()
        # kmock's classes are frozen attrs classes: set past the freeze
        object.__setattr__(self._objects, "_objects", _ByName(self._objects._objects))
        object.__setattr__(self, "_served", None)

    def _get_resources(self) -> list[Any]:
        if self._served is None:  # every resource is registered before the first request (`register`)
            object.__setattr__(self, "_served", kmock.KubernetesScaffold._get_resources(self))
        return self._served

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:  # noqa: N802
        if request.name is None:  # a list: every object is a candidate
            return kmock.KubernetesEmulator._KubernetesEmulator__get_objs(self, request, strict)  # type: ignore[attr-defined]
        store = self._objects._objects
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
        return [store[k] for k in list(store.names.get(request.name, ())) if check(request, *k, strict=strict)]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.log is not None:
            self.log.write(f"{str(getattr(request.method, 'value', request.method)).upper()} {request.url.path_qs}\n")
            self.log.flush()
        try:
            return await self._serve(request)
        finally:
            self._requests[:] = [r for r in self._requests if r is not request]

    async def _serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is not None and res.plural and not any(
                (r.group, r.version, r.plural) == (res.group, res.version, res.plural) for r in self._get_resources()):
            return await self._render_error(k8s.KubernetesResourceNotFoundError())
        data = request.data if isinstance(request.data, dict) else None
        if res is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
                if data.get("kind") == "Secret" and data.get("stringData"):  # the API server stores it as data
                    data.setdefault("data", {}).update(
                        {k: base64.b64encode(v.encode()).decode() for k, v in data.pop("stringData").items()})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=str(next(_versions)),
                            creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif request.action == enums.action.UPDATE and request.name is not None:
                meta["resourceVersion"] = str(next(_versions))
                if "spec" in data and not request.subresource:
                    key = (res, request.namespace, request.name)
                    if key in self.objects and not self.objects[key].deleted:
                        meta["generation"] = int(self.objects[key].get("metadata", {}).get("generation") or 1) + 1
        return await super()._handle(request)


def register(api: ApiServer, kuberay: bool) -> None:
    api.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list", "watch", "patch"})
    api.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch"})
    api.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs={"get", "create", "list"})
    api.resources["networking.k8s.io/v1/networkpolicies"] = kmock.ResourceInfo(
        kind="NetworkPolicy", namespaced=True, verbs={"get", "list", "create", "patch"})
    api.resources["kubedistill.io/v1alpha1/distillationruns"] = kmock.ResourceInfo(
        kind="DistillationRun", singular="distillationrun", namespaced=True, shortnames={"dr"},
        verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"})
    api.resources["zalando.org/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"get", "list", "watch", "patch", "create"})
    if kuberay:
        for plural, kind in (("rayjobs", "RayJob"), ("rayservices", "RayService"), ("rayclusters", "RayCluster")):
            api.resources[f"ray.io/v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"},
                subresources={"status"})


async def main(port: int, kuberay: bool, log: str | None = None) -> None:
    api = ApiServer()
    register(api, kuberay)
    if log:
        api.log = open(log, "a")  # noqa: SIM115 - open while the server runs
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with api, kmock.Server(api, host="127.0.0.1", port=port):
        print("ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--no-kuberay", dest="kuberay", action="store_false")
    p.add_argument("--log-requests", default=None)
    a = p.parse_args()
    asyncio.run(main(a.port, a.kuberay, a.log_requests))
