"""The error an HTTP handler raises, in the one shape every API error has:
{"error": {"status", "code", "message", "details"?}}.

A neutral module: the API routers, the web pages, the request dependencies (app/deps.py) and the
inference client all raise it, and app/api/errors.py turns it into a response.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details=None, headers: dict | None = None):
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers
        if status == 401 and headers is None:
            self.headers = {"WWW-Authenticate": 'Bearer realm="sae-atlas"'}
        super().__init__(message)


def error_body(status: int, code: str, message: str, details=None) -> dict:
    body = {"status": status, "code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}
