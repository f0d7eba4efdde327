"""Errors the API answers with: JSON `{"error": {"code", "message", "details"?}}`, a stable code and a
message that says what to fix; never a stack trace or a file path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

# pydantic error types -> our stable codes (custom validators raise PydanticCustomError with our code)
_PYDANTIC_CODES = {
    "extra_forbidden": "unknown_field",
    "missing": "missing_field",
    "finite_number": "non_finite",
    "too_long": "too_many",
    "too_short": "too_few",
    "less_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "greater_than": "out_of_range",
    "literal_error": "invalid_choice",
    "enum": "invalid_choice",
}


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, human message."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.details = headers or {}, details

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = self.details
        return {"error": err}


def from_domain(exc: Any) -> ApiError:
    """An `ingest.space.DomainError` (a point outside the trained disc, a value outside its physical range,
    a context below the trained minimum, ...) as 422 with the same stable code and message."""
    return ApiError(422, exc.code, exc.message)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def from_validation(exc: ValidationError) -> ApiError:
    """422 with one detail per problem; the top-level code is the first problem's."""
    details = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        t = e["type"]
        code = _PYDANTIC_CODES.get(t) or (t if t in CUSTOM_CODES else
                                          "invalid_type" if t.endswith(("_type", "_parsing")) else "invalid_value")
        details.append({"loc": _loc(tuple(e["loc"])), "code": code, "message": e["msg"]})
    first = details[0]
    return ApiError(422, first["code"], f"{first['loc']}: {first['message']}", details=details)


# codes raised by our own validators (PydanticCustomError type == code)
CUSTOM_CODES = {
    "length_mismatch", "unknown_variable", "duplicated_variable", "missing_variable", "out_of_region",
    "swapped_coordinates", "longitude_0_360", "out_of_physical_range", "too_many", "too_few",
    "invalid_choice", "invalid_value", "non_finite", "duplicate_key", "out_of_range",
}
