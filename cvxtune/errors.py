"""The one error hierarchy shared by the API and the workers.

Every error carries a stable machine-readable `code`, an HTTP status and a message that is safe
to show a client. The API renders them as RFC 9457 problem+json; workers store code and message
on the failed job. `transient` errors are retried with backoff; the others fail once.
"""

from __future__ import annotations


class CvxtuneError(Exception):
    code = "internal_error"
    status = 500
    transient = False

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(CvxtuneError):
    """The client sent something we cannot use; retrying will not help."""

    code = "invalid_input"
    status = 422


class DatasetError(InvalidInput):
    """A dataset archive or manifest is malformed, unsafe or too small."""

    code = "invalid_dataset"


class WeightsUnavailable(CvxtuneError):
    """A backbone's weights are not available on this machine."""

    code = "weights_unavailable"
    status = 409


class NotFound(CvxtuneError):
    code = "not_found"
    status = 404


class TransientError(CvxtuneError):
    """A fault that may pass (broker, database or store unreachable); retried with backoff."""

    code = "transient_error"
    status = 503
    transient = True
