"""The scheduler's HTTP contract as an OpenAPI 3 document, and the request validator derived
from it.

The request schemas below are the single source of truth: :func:`compile_schema` turns each
into a checker that the handlers call, so the document served at ``/openapi.json`` and the
validation cannot drift apart. Checkers reject unknown fields, wrong types (a boolean is not
an integer), out-of-range numbers, over-long strings and arrays, and name the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from netkv.errors import InputError

JSON = dict[str, Any]
Checker = Callable[[Any, str], Any]

MAX_ID_LENGTH = 256
MAX_PROMPT_TOKENS = 10_000_000
MAX_HASH = 2**63 - 1

_ERROR = {"type": "object", "required": ["error", "field"],
          "properties": {"error": {"type": "string"}, "field": {"type": "string"}}}


def select_request(policies: Sequence[str], max_block_hashes: int) -> JSON:
    return {
        "type": "object", "additionalProperties": False,
        "required": ["request_id", "prefill", "prompt_tokens"],
        "properties": {
            "request_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
                           "description": "the router's id; reservations are keyed by it"},
            "prefill": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
                        "description": "the prefill instance that computes the KV cache"},
            "prompt_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_PROMPT_TOKENS},
            "output_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_PROMPT_TOKENS,
                              "default": 0,
                              "description": "tokens the decoder must reserve for the answer"},
            "block_hashes": {"type": "array", "maxItems": max_block_hashes,
                             "items": {"type": "integer", "minimum": 0, "maximum": MAX_HASH},
                             "description": "prefix block hashes (for cache-aware policies)"},
            "policy": {"type": "string", "enum": list(policies)},
            "reserve": {"type": "boolean", "default": True,
                        "description": "book the decoder until release or expiry"},
        },
    }


SELECT_RESPONSE: JSON = {
    "type": "object",
    "required": ["request_id", "decode", "predicted_ttft_ms", "breakdown", "tier",
                 "map_version", "map_age_ms", "map_stale", "policy", "reserved"],
    "properties": {
        "request_id": {"type": "string"},
        "decode": {"type": "string"},
        "decode_host": {"type": "string"},
        "prefill": {"type": "string",
                    "description": "the prefill instance to use: the requested one, or the "
                    "joint choice of netkv_pair (which treats every prefill as ready now)"},
        "predicted_ttft_ms": {"type": "number"},
        "breakdown": {"type": "object", "properties": {
            "queue_ms": {"type": "number"}, "transfer_ms": {"type": "number"},
            "first_token_ms": {"type": "number"}}},
        "tier": {"type": "integer", "minimum": 0, "maximum": 3},
        "kv_bytes": {"type": "number"},
        "map_version": {"type": ["integer", "null"]},
        "map_age_ms": {"type": ["number", "null"]},
        "map_stale": {"type": "boolean"},
        "policy": {"type": "string"},
        "reserved": {"type": "boolean"},
    },
}

RELEASE_REQUEST: JSON = {
    "type": "object", "additionalProperties": False, "required": ["request_id"],
    "properties": {"request_id": {"type": "string", "minLength": 1,
                                  "maxLength": MAX_ID_LENGTH}},
}

INSTANCE_REQUEST: JSON = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
        "role": {"type": "string", "enum": ["prefill", "decode"]},
        "host": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
        "running": {"type": "number", "minimum": 0, "maximum": 1e6},
        "waiting": {"type": "number", "minimum": 0, "maximum": 1e6},
        "kv_use": {"type": "number", "minimum": 0, "maximum": 1},
        "capacity_tokens": {"type": "number", "minimum": 1, "maximum": 1e12,
                            "description": "KV memory of a decoder, in tokens"},
        "metrics_url": {"type": "string", "maxLength": 2048, "pattern": "^https?://[^\\s]+$"},
    },
}


def _body(schema: JSON) -> JSON:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answers(ok: JSON | None, *codes: int) -> JSON:
    out: JSON = {"200": {"description": "ok"}}
    if ok is not None:
        out["200"]["content"] = {"application/json": {"schema": ok}}
    for code in codes:
        out[str(code)] = {"description": "bad input, the field is named",
                          "content": {"application/json": {"schema": _ERROR}}}
    return out


def document(policies: Sequence[str], max_block_hashes: int, auth: bool) -> JSON:
    """The OpenAPI 3.0 document served at ``/openapi.json``."""
    mutating_codes = (400, 401, 413, 415) if auth else (400, 413, 415)
    security: list[JSON] = [{"bearer": []}] if auth else []
    doc: JSON = {
        "openapi": "3.0.3",
        "info": {"title": "NetKV scheduler", "version": "1",
                 "description": "Network-aware decode-instance selection."},
        "paths": {
            "/v1/select": {"post": {
                "operationId": "select", "security": security,
                "summary": "choose the decode instance for a request (and book it)",
                "requestBody": _body(select_request(policies, max_block_hashes)),
                "responses": _answers(SELECT_RESPONSE, *mutating_codes)}},
            "/v1/release": {"post": {
                "operationId": "release", "security": security,
                "summary": "end a reservation (idempotent)",
                "requestBody": _body(RELEASE_REQUEST),
                "responses": _answers(None, *mutating_codes)}},
            "/v1/instances": {
                "get": {"operationId": "instances", "summary": "instances, load, bookings",
                        "responses": _answers(None)},
                "post": {"operationId": "register", "security": security,
                         "summary": "register an instance or refresh its load",
                         "requestBody": _body(INSTANCE_REQUEST),
                         "responses": _answers(None, *mutating_codes)}},
            "/healthz": {"get": {"operationId": "healthz", "responses": _answers(None)}},
            "/readyz": {"get": {"operationId": "readyz", "responses": {
                "200": {"description": "ready (maybe degraded: see reasons)"},
                "503": {"description": "not ready: no congestion map yet"}}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
    }
    if auth:
        doc["components"] = {"securitySchemes": {"bearer": {"type": "http",
                                                            "scheme": "bearer"}}}
    return doc


# -- validation derived from the schemas ---------------------------------------------------
def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def compile_schema(schema: JSON) -> Checker:
    """A function ``check(value, where) -> value`` enforcing ``schema`` (the subset above)."""
    kind = schema.get("type")
    if kind == "object":
        return _object_checker(schema)
    if kind == "array":
        item = compile_schema(schema.get("items", {}))
        max_items = schema.get("maxItems")

        def check_array(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise InputError(where, f"expected an array, got {_type_name(value)}")
            if max_items is not None and len(value) > max_items:
                raise InputError(where, f"at most {max_items} items, got {len(value)}")
            if schema.get("items", {}).get("type") == "integer":
                _check_int_items(value, where, schema["items"])
                return value
            return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return check_array
    return _scalar_checker(schema)


def _check_int_items(value: list[Any], where: str, schema: JSON) -> None:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    for i, v in enumerate(value):
        if type(v) is not int:
            raise InputError(f"{where}[{i}]", f"expected an integer, got {_type_name(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise InputError(f"{where}[{i}]", f"must be in [{lo}, {hi}], got {v}")


def _object_checker(schema: JSON) -> Checker:
    props = {k: compile_schema(v) for k, v in schema.get("properties", {}).items()}
    required = list(schema.get("required", []))
    closed = schema.get("additionalProperties", True) is False
    defaults = {k: v["default"] for k, v in schema.get("properties", {}).items()
                if "default" in v}

    def check_object(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise InputError(where, f"expected an object, got {_type_name(value)}")
        for key in required:
            if key not in value:
                raise InputError(f"{where}.{key}", "missing required field")
        out = dict(defaults)
        for key, v in value.items():
            check = props.get(key)
            if check is None:
                if closed:
                    raise InputError(f"{where}.{str(key)[:64]}",
                                     f"unknown field; known: {', '.join(props)}")
                continue
            out[key] = check(v, f"{where}.{key}")
        return out
    return check_object


def _scalar_checker(schema: JSON) -> Checker:
    kind = schema.get("type")
    enum = schema.get("enum")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    min_len, max_len = schema.get("minLength"), schema.get("maxLength")
    pattern = re.compile(schema["pattern"]) if "pattern" in schema else None

    def check_scalar(value: Any, where: str) -> Any:
        if kind == "string":
            if not isinstance(value, str):
                raise InputError(where, f"expected a string, got {_type_name(value)}")
            if min_len is not None and len(value) < min_len:
                raise InputError(where, "must not be empty" if min_len == 1
                                 else f"at least {min_len} characters")
            if max_len is not None and len(value) > max_len:
                raise InputError(where, f"at most {max_len} characters, got {len(value)}")
            if pattern is not None and not pattern.search(value):
                raise InputError(where, f"must match {pattern.pattern}")
        elif kind == "integer":
            if type(value) is not int:
                raise InputError(where, f"expected an integer, got {_type_name(value)}")
        elif kind == "number":
            if type(value) not in (int, float):
                raise InputError(where, f"expected a number, got {_type_name(value)}")
            if not math.isfinite(value):
                raise InputError(where, f"must be a finite number, got {value!r}")
        elif kind == "boolean" and type(value) is not bool:
            raise InputError(where, f"expected a boolean, got {_type_name(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InputError(where, f"must be in [{lo}, {hi}], got {value!r}")
        if enum is not None and value not in enum:
            raise InputError(where, f"must be one of {', '.join(map(str, enum))}, "
                             f"got {str(value)[:64]!r}")
        return value
    return check_scalar
