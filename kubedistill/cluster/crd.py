"""Generate the DistillationRun CRD from the spec models (the models are the source of truth).

Pydantic's JSON schema is turned into a Kubernetes *structural* schema: `$ref`s inlined, `anyOf
[X, null]` becomes `X` with `nullable: true`, titles dropped, `additionalProperties: false` dropped
(the API server prunes unknown fields; `kubectl apply` rejects them with strict field validation), and
free-form maps keep `additionalProperties` with a typed value schema.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from kubedistill.core import spec

_DROP = {"title"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) != len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {node}")
        merged = _structural({**options[0], **rest}, defs)
        if nullable:
            merged["nullable"] = True
            if merged.get("default", 0) is None:
                merged.pop("default")
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):  # JSON Schema 2020 → OpenAPI 3.0
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    _state_bound(out)
    return out


def _state_bound(node: dict[str, Any]) -> None:
    """Say a number's upper bound in its description (what `kubectl explain` shows), unless it already does."""
    top, description = node.get("maximum"), node.get("description")
    if node.get("type") not in ("integer", "number") or top is None or not description:
        return
    if "at most" in description.lower() or "below" in description.lower():
        return
    shown = f"{top:,}" if float(top).is_integer() else f"{top:g}"
    node["description"] = f"{description.rstrip()} {'Below' if node.get('exclusiveMaximum') else 'At most'} {shown}."


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _status_schema() -> dict[str, Any]:
    schema = model_schema(spec.RunStatus)
    # metrics are free-form numbers and strings written by each stage
    stage = schema["properties"]["stages"]["items"]
    stage["properties"]["metrics"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return schema


def generate() -> dict[str, Any]:
    spec_schema = model_schema(spec.DistillationRunSpec)
    plural = "distillationruns"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{spec.API_GROUP}"},
        "spec": {
            "group": spec.API_GROUP,
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": plural,
                "singular": "distillationrun",
                "shortNames": ["dr"],
                "categories": ["kubedistill"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": spec.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A search-relevance distillation pipeline run.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": _status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_yaml() -> str:
    import yaml

    header = "# Generated by `kubedistill crd` from kubedistill/core/spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(generate(), sort_keys=False, width=120)


def _type(node: dict[str, Any]) -> str:
    t = node.get("type", "object")
    if t == "array":
        return f"list of {_type(node.get('items', {}))}"
    if t == "object" and "additionalProperties" in node:
        return f"map of {_type(node['additionalProperties'])}"
    return str(t)


def _constraints(node: dict[str, Any]) -> str:
    out = []
    if "enum" in node:
        out.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "items" in node and "enum" in node["items"]:
        out.append("each one of " + ", ".join(f"`{v}`" for v in node["items"]["enum"]))
    for key, sym in (("minimum", ">"), ("maximum", "<")):
        if key in node:
            strict = node.get("exclusiveM" + key[1:])
            out.append(f"{sym}{'' if strict else '='} {node[key]}")
    for key, what in (
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    ):
        if key in node:
            out.append(f"{what} {node[key]}")
    if "pattern" in node:
        out.append(f"matches `{node['pattern']}`")
    for rule in node.get("x-kubernetes-validations", []):
        out.append(rule["message"])
    return "; ".join(out)


def _effective(defaults: Any, path: str) -> Any:
    """The value a minimal resource gets at `path` (spec.a.b), None where it has none."""
    for part in path.split(".")[1:]:
        if not isinstance(defaults, dict) or part not in defaults:
            return None
        defaults = defaults[part]
    return defaults


def _rows(node: dict[str, Any], path: str, required: bool, defaults: Any) -> list[tuple[str, str, str, str, str]]:
    """(field, type, default, constraints, description) for `node` and everything under it; defaults are the
    values a minimal resource actually gets (a section's own defaults can differ from its type's, e.g. the
    student's training budget)."""
    import json

    rows = []
    default = None if required else _effective(defaults, path) if "[]" not in path else node.get("default")
    shown_default = (
        "" if default is None or (isinstance(default, (dict, list)) and not default) else f"`{json.dumps(default)}`"
    )
    desc = " ".join(str(node.get("description", "")).split())
    props = node.get("properties")
    if not props or node.get("description") or node.get("x-kubernetes-validations"):
        rows.append(
            (
                f"`{path}`" + (" (required)" if required else ""),
                _type(node),
                shown_default if not props else "",
                _constraints(node),
                desc,
            )
        )
    for name, child in (props or {}).items():
        rows.extend(_rows(child, f"{path}.{name}", name in node.get("required", []), defaults))
    items = node.get("items", {})
    if items.get("properties"):
        for name, child in items["properties"].items():
            rows.extend(_rows(child, f"{path}[].{name}", name in items.get("required", []), defaults))
    return rows


def reference_markdown() -> str:
    """The DistillationRun field reference as a Markdown table, from the CRD's own schema (so from the spec models)."""
    schema = model_schema(spec.DistillationRunSpec)
    minimal = spec.to_wire(spec.DistillationRunSpec.model_validate({"storage": {"uri": "s3://bucket/prefix"}}))
    rows = _rows(schema, "spec", True, minimal)
    lines = ["| field | type | default | constraints | description |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines) + "\n"
