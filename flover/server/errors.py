"""Errors as OpenAI answers them: ``{"error": {"message", "type", "param", "code"}}``, never a traceback."""

from __future__ import annotations

import reprlib

from starlette.responses import JSONResponse

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxlist, _repr.maxdict, _repr.maxlong, _repr.maxother = 40, 6, 4, 30, 40


def shown(value) -> str:
    """A client's value in a one-line message, cut short (a 1 MB prompt must not come back whole)."""
    return _repr.repr(value)


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI-style error body."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_unavailable"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def internal_error() -> APIError:
    """What a client learns of a bug: that it happened, and where to look."""
    return APIError(500, "internal server error; the server log has the details, and the server keeps serving",
                    code="internal_error")  # fmt: skip
