"""OpenAI-style error bodies, like vLLM's own, with a machine-readable ``code`` string.

``{"error": {"message": ..., "type": "BadRequestError", "param": "steering.vectors[0].name",
"code": "unknown_vector"}}``: clients branch on ``code`` (a reason from
``vsteer.engine.errors.REJECTION_REASONS`` for steering, or one of ``ADMIN_CODES`` for
the registry routes) and never need to parse ``message``.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

ADMIN_CODES = {
    "invalid_request": "the body is not what the route takes (JSON object, fields, types)",
    "invalid_name": "a vector name that is not a plain identifier",
    "bad_vector_file": "an uploaded or referenced set that does not load (format, hash, shapes, NaN)",
    "wrong_hidden_size": "a set made for another model",
    "path_not_allowed": "a path outside the directories sets may be loaded from",
    "not_found": "no such vector set (or path)",
    "name_exists": "the name is taken (send overwrite: true)",
    "used_by_default_steering": "the set is part of the server's default steering",
    "used_by_steered_model": "the set is part of a steered model (remove or change the model first)",
    "defined_by_flag": "a steered model from the command line (--steered-model) cannot be changed at run time",
    "no_registry": "the server runs without a vector directory",
    "unauthorized": "the admin key is missing or wrong",
    "admin_disabled": "the admin routes are off (no VSTEER_ADMIN_KEY)",
    "payload_too_large": "the body is over VSTEER_MAX_UPLOAD_BYTES",
    "insufficient_storage": "the registry volume is full; nothing was changed",
    "storage_error": "the registry could not be written; nothing was changed",
}

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          409: "ConflictError", 413: "RequestTooLargeError", 500: "InternalServerError",
          507: "InsufficientStorageError"}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "BadRequestError"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


class AdminError(Exception):
    """A refused admin request: status, message, ``code`` (``ADMIN_CODES``) and field."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param)
