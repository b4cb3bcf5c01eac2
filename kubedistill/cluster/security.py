"""What the operator lets a run use in a shared cluster, as plain functions (SECURITY.md is the threat model).

- **Storage credentials.** A run names a Secret in its own namespace (`spec.storage.secretRef`). The
  operator reads it only when it opts in with the label `kubedistill.io/storage-credentials: "true"`,
  and only its two keys; stage pods get those keys one by one (`secretKeyRef`), never the whole Secret.
  Without a Secret the operator's own credentials are used only against its own default endpoint:
  never against an endpoint a run chose.
- **Endpoints.** `https://` only, unless the chart lists a plain-HTTP endpoint in
  `storage.allowedEndpoints` (an in-cluster MinIO); link-local and cloud-metadata addresses are refused
  everywhere (`kubedistill.core.spec` checks those for local runs too).
- **Network.** Each run's Ray pods admit each other on every port, the operator and KubeRay on the Ray
  ports (GCS 6379, dashboard/Jobs API 8265, client 10001), and the Serve port only from the peers the
  chart names (`serving.allowedFrom`): one NetworkPolicy per run (`k8s.network_policy`). Every Ray
  cluster also requires a token (KubeRay's `authOptions`) kept in a Secret the operator creates per run.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kubedistill.core.spec import endpoint_problem

#: the label a Secret carries to be usable as a run's storage credentials
CREDENTIALS_LABEL = "kubedistill.io/storage-credentials"
#: the keys stage pods get from it (the session token only where present)
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIAL_KEYS = ("AWS_SESSION_TOKEN",)

#: NetworkPolicy peers when the chart says nothing (`kubedistill render`, tests): the operator and KubeRay's
#: operator by the labels their charts give them, in any namespace; Serve from pods of the run's namespace
OPERATOR_PEER: dict[str, Any] = {
    "namespaceSelector": {},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubedistill"}},
}
KUBERAY_PEER: dict[str, Any] = {
    "namespaceSelector": {},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
}
SERVING_FROM: list[dict[str, Any]] = [{"podSelector": {}}]


class CredentialsRefused(RuntimeError):
    """A run's storage credentials cannot be used: the message names the field and what to do."""


@dataclass(frozen=True)
class Settings:
    """The chart's security settings, as the operator receives them (environment, see `from_env`)."""

    #: plain-HTTP endpoints runs may use (exact `scheme://host[:port]`); every other one must be https://
    allowed_endpoints: tuple[str, ...] = ()
    #: create a NetworkPolicy per run
    network_policy: bool = True
    operator_peer: dict[str, Any] = field(default_factory=lambda: dict(OPERATOR_PEER))
    kuberay_peer: dict[str, Any] = field(default_factory=lambda: dict(KUBERAY_PEER))
    #: who may reach the Serve port (NetworkPolicyPeer objects); empty: only the run's own pods
    serving_from: tuple[dict[str, Any], ...] = tuple(SERVING_FROM)
    #: who may scrape the Ray pods' metrics port (the chart's monitoring.scrapeFrom); empty: no one outside the run
    metrics_from: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """KUBEDISTILL_ALLOWED_ENDPOINTS (comma-separated), KUBEDISTILL_NETWORK_POLICY (0/1), and JSON in
        KUBEDISTILL_OPERATOR_PEER, KUBEDISTILL_KUBERAY_PEER, KUBEDISTILL_SERVING_ALLOWED_FROM,
        KUBEDISTILL_METRICS_ALLOWED_FROM (the chart sets all)."""

        def js(name: str, default: Any) -> Any:
            text = env.get(name)
            if not text:
                return default
            try:
                return json.loads(text)
            except ValueError as e:
                raise ValueError(f"${name}: not valid JSON ({e})") from None

        allowed = tuple(_origin(e) for e in (env.get("KUBEDISTILL_ALLOWED_ENDPOINTS") or "").split(",") if e.strip())
        serving = js("KUBEDISTILL_SERVING_ALLOWED_FROM", SERVING_FROM) or []
        if not isinstance(serving, list):
            raise ValueError("$KUBEDISTILL_SERVING_ALLOWED_FROM: expected a JSON list of NetworkPolicy peers")
        metrics = js("KUBEDISTILL_METRICS_ALLOWED_FROM", []) or []
        if not isinstance(metrics, list):
            raise ValueError("$KUBEDISTILL_METRICS_ALLOWED_FROM: expected a JSON list of NetworkPolicy peers")
        return cls(
            allowed_endpoints=allowed,
            network_policy=env.get("KUBEDISTILL_NETWORK_POLICY", "1") not in ("0", "false", "False"),
            operator_peer=js("KUBEDISTILL_OPERATOR_PEER", OPERATOR_PEER),
            kuberay_peer=js("KUBEDISTILL_KUBERAY_PEER", KUBERAY_PEER),
            serving_from=tuple(serving),
            metrics_from=tuple(metrics),
        )


def _origin(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{(parts.netloc or '').lower()}"


def endpoint_refused(endpoint: str | None, allowed: tuple[str, ...]) -> str | None:
    """Why the operator will not use `spec.storage.endpoint` (None: it may): link-local and metadata addresses
    never, plain HTTP only when the chart lists it."""
    if endpoint is None:
        return None
    if problem := endpoint_problem(endpoint):
        return f"spec.storage.endpoint: {problem}"
    if urlsplit(endpoint).scheme.lower() == "https" or _origin(endpoint) in allowed:
        return None
    listed = ", ".join(allowed) or "none"
    return (
        f"spec.storage.endpoint: {endpoint} is plain HTTP; use https://, or have the cluster admin list it in the "
        f"chart's storage.allowedEndpoints (listed now: {listed})"
    )


def credentials(name: str, namespace: str, labels: Mapping[str, str], data: Mapping[str, str]) -> tuple[str, str]:
    """(access key, secret key) from a Secret's labels and base64 data, or CredentialsRefused saying why."""
    where = f"spec.storage.secretRef: secret {name!r} in namespace {namespace}"
    if (labels or {}).get(CREDENTIALS_LABEL) != "true":
        raise CredentialsRefused(
            f"{where} is not labelled {CREDENTIALS_LABEL}=true; the operator reads only Secrets that opt in "
            f"(kubectl label secret {name} -n {namespace} {CREDENTIALS_LABEL}=true)"
        )
    missing = [k for k in CREDENTIAL_KEYS if not (data or {}).get(k)]
    if missing:
        raise CredentialsRefused(
            f"{where} has no {' or '.join(missing)}; it needs both {' and '.join(CREDENTIAL_KEYS)}"
        )
    try:
        key, secret = (base64.b64decode(data[k], validate=True).decode() for k in CREDENTIAL_KEYS)
    except (ValueError, UnicodeDecodeError):
        raise CredentialsRefused(f"{where}: {' / '.join(CREDENTIAL_KEYS)} are not valid base64 text") from None
    return key, secret


def ambient_refused(endpoint: str | None, own: str | None) -> str | None:
    """Why a run without `secretRef` may not use the operator's own credentials (None: it may). Those are for
    the operator's own endpoint only (`own`: its $AWS_ENDPOINT_URL, None for AWS): a run that names another
    endpoint must bring its own Secret."""
    if endpoint is None or (own and _origin(endpoint) == _origin(own)):
        return None
    return (
        f"spec.storage.endpoint: {endpoint} is set but spec.storage.secretRef is not; the operator never sends its "
        f"own credentials to an endpoint a run chose: name a Secret labelled {CREDENTIALS_LABEL}=true"
    )
