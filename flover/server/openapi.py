"""The OpenAPI document of the server (``GET /openapi.json``), built from the request schema it checks against."""

from __future__ import annotations

from flover.server.schemas import CompletionRequest

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}  # fmt: skip


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    reasons = {400: "a field is wrong; the message names it and its limit", 404: "the model is not served here",
               413: "the body is too large", 429: "the waiting queue is full", 500: "an internal error",
               503: "shutting down, or the engine failed"}  # fmt: skip
    return {str(s): _json({"$ref": "#/components/schemas/Error"}, reasons[s]) for s in statuses}


def document(version: str) -> dict:
    schemas = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = {**schemas.pop("$defs", {}), "CompletionRequest": schemas, "Error": ERROR}
    completion = {"type": "object", "required": ["id", "object", "choices"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "flover", "version": version,
                 "description": "OpenAI-compatible completions on flover's fused engine"},  # fmt: skip
        "paths": {
            "/v1/completions": {"post": {
                "operationId": "createCompletion",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
                "responses": {"200": {"description": "the completion, or with stream: server-sent events of chunks "
                                                     "ending in data: [DONE]",
                                      "content": {"application/json": {"schema": completion},
                                                  "text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(400, 404, 413, 429, 500, 503)}}},
            "/v1/models": {"get": {"operationId": "listModels",
                                   "responses": {"200": _json({"type": "object"}, "the served model")}}},
            "/health": {"get": {"operationId": "health",
                                "responses": {"200": _json({"type": "object"}, "serving"), **_errors(503)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": components},
    }  # fmt: skip
