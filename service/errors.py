"""Errors the API answers with: JSON `{"error": {"code", "message", "details"?}}`, a stable code and a
message that says what to fix; never a stack trace or a file path."""

from __future__ import annotations

from itertools import islice
from typing import Any

from pydantic import ValidationError

MAX_DETAILS = 20  # problems listed in one error; `count` says how many there were

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


def clip(text: str, n: int = 200) -> str:
    """Client input echoed in an error, cut to `n` characters (a 1 MB name must not give a 1 MB error)."""
    return text if len(text) <= n else f"{text[:n]}...({len(text) - n} more characters)"


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, human message."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 details: list[dict[str, Any]] | None = None, count: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.details, self.count = headers or {}, details, count

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = self.details[:MAX_DETAILS]
            err["count"] = self.count if self.count is not None else len(self.details)
        return {"error": err}


def from_domain(exc: Any) -> ApiError:
    """An `ingest.space.DomainError` (a point outside the trained disc, a value outside its physical range,
    a context below the trained minimum, ...) as 422 with the same stable code and message."""
    return ApiError(422, exc.code, exc.message)


def loc_str(loc: tuple[Any, ...]) -> str:
    """A dotted location, without the tags of tagged unions (`targets.points.latitude` reads
    `targets.latitude`), each part clipped (keys are client input)."""
    parts = [str(p)[:40] for i, p in enumerate(loc) if not (i and loc[i - 1] == "targets" and p in _TAGS)]
    return ".".join(parts) or "body"


_TAGS = {"points", "circle"}  # service.schemas.Targets


def from_validation(exc: ValidationError) -> ApiError:
    """422 with the first MAX_DETAILS problems and their `count`; the top-level code is the first one's."""
    details = []
    for e in islice(exc.errors(include_url=False, include_input=False, include_context=False), MAX_DETAILS):
        t = e["type"]
        code = _PYDANTIC_CODES.get(t) or (t if t in CUSTOM_CODES else
                                          "invalid_type" if t.endswith(("_type", "_parsing")) else "invalid_value")
        details.append({"loc": loc_str(tuple(e["loc"])), "code": code, "message": e["msg"][:300]})
    first = details[0]
    return ApiError(422, first["code"], f"{first['loc']}: {first['message']}", details=details,
                    count=exc.error_count())


# codes raised by our own validators (PydanticCustomError type == code)
CUSTOM_CODES = {
    "length_mismatch", "unknown_variable", "duplicated_variable", "missing_variable", "out_of_region",
    "swapped_coordinates", "longitude_0_360", "out_of_physical_range", "too_many", "too_few",
    "invalid_choice", "invalid_value", "non_finite", "duplicate_key", "out_of_range", "duplicated_point",
}
