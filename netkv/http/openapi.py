"""The OpenAPI 3.0 document of a NetKV server, generated from its body Structs.

Each :class:`Operation` names its request and response types (msgspec Structs); their JSON
Schemas come from :func:`msgspec.json.schema_components`, so the document and the decoding
cannot drift apart. Errors share one schema (``Error``: ``{"error", "field"}``). The schemas
are written in OpenAPI 3.0's dialect (``nullable`` instead of a ``null`` branch), whose
"integer" excludes ``1.0`` exactly as the decoder does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

JSON = dict[str, Any]
REF = "#/components/schemas/{name}"


class Error(msgspec.Struct):
    """Every 4xx/5xx answer: a message and the field (or ``auth``, ``path``...) it is about."""

    error: str
    field: str


@dataclass(frozen=True)
class Operation:
    """One route: method, path, summary, body/answer types, the statuses it may answer."""

    method: str
    path: str
    operation_id: str
    summary: str = ""
    request: type | None = None
    response: type | None = None
    errors: Sequence[int] = ()
    secured: bool = False
    responses: JSON = field(default_factory=dict)  # hand-written extra answers (non-JSON)


def document(title: str, description: str, operations: Sequence[Operation], *,
             auth: bool, patch: Callable[[JSON], None] | None = None) -> JSON:
    """The document; ``patch(schemas)`` may refine the generated schemas (run-time enums)."""
    types = [t for op in operations for t in (op.request, op.response) if t is not None]
    (refs, schemas) = msgspec.json.schema_components([*types, Error], ref_template=REF)
    by_type = dict(zip([*types, Error], refs, strict=True))
    schemas = {k: to_openapi30(v) for k, v in schemas.items()}
    if patch is not None:
        patch(schemas)
    paths: JSON = {}
    for op in operations:
        entry: JSON = {"operationId": op.operation_id, "summary": op.summary,
                       "responses": {"200": {"description": "ok"}} | op.responses}
        if op.response is not None:
            entry["responses"]["200"]["content"] = {
                "application/json": {"schema": by_type[op.response]}}
        names = re.findall(r"\{(\w+)\}", op.path)
        if names:
            entry["parameters"] = [{"name": n, "in": "path", "required": True,
                                    "schema": {"type": "string", "maxLength": 256}}
                                   for n in names]
        if op.request is not None:
            entry["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": by_type[op.request]}}}
        codes = [*op.errors, *((401,) if op.secured and auth else ())]
        for code in sorted(set(codes)):
            entry["responses"][str(code)] = {
                "description": _DESCRIPTIONS.get(code, "error"),
                "content": {"application/json": {"schema": by_type[Error]}}}
        if op.secured:
            entry["security"] = [{"bearer": []}] if auth else []
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    components: JSON = {"schemas": schemas}
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.0.3", "info": {"title": title, "version": "1",
                                         "description": description},
            "paths": paths, "components": components}


def to_openapi30(schema: Any) -> Any:
    """JSON Schema 2020-12 (msgspec's output) in OpenAPI 3.0's dialect."""
    if isinstance(schema, list):
        return [to_openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_openapi30(v) for k, v in schema.items()}
    branches = out.get("anyOf")
    if isinstance(branches, list) and {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = rest[0] | out
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    return out


_DESCRIPTIONS = {400: "bad input, the field is named", 401: "missing or wrong bearer token",
                 404: "not found", 408: "body not received in time", 413: "body too large",
                 415: "not application/json", 429: "too many", 503: "not ready"}
