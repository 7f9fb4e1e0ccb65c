"""Domain errors raised by the engine and the service. The web layer maps them to HTTP in one table."""

from __future__ import annotations


class DDMError(Exception):
    """Base class; ``code`` is the stable machine-readable error code sent to clients."""

    code = "internal"


class InvalidInput(DDMError, ValueError):
    """A request field or an image that cannot be used (400)."""

    code = "bad_input"


class UnsupportedMediaType(InvalidInput):
    """A content type or image format the service does not accept (415)."""

    code = "unsupported_media_type"


class PayloadTooLarge(InvalidInput):
    """Bytes, pixels or image count over the configured caps (413)."""

    code = "too_large"


class ModelNotReady(DDMError, RuntimeError):
    """The model is loading, failed to load, or the service is draining (503)."""

    code = "not_ready"


class Overloaded(DDMError, RuntimeError):
    """The image queue cannot take the request now (503 + Retry-After)."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(DDMError, TimeoutError):
    """The request's deadline passed before its results were ready (504)."""

    code = "timeout"


class ProfileNotFound(DDMError, KeyError):
    """No calibration profile of that name for the loaded model (404)."""

    code = "profile_not_found"

    def __str__(self) -> str:  # KeyError quotes its message; clients should see it plain
        return str(self.args[0]) if self.args else "profile not found"


class ModelNotFound(DDMError, KeyError):
    """No loaded model with that id (404)."""

    code = "model_not_found"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


class ProfileMismatch(DDMError, ValueError):
    """A calibration profile made for another model or other method options, or corrupt (refused at load)."""

    code = "profile_mismatch"


class ProfileConflict(DDMError, ValueError):
    """The profile name is taken (also by another case), being created right now, or protected."""

    code = "profile_conflict"


class Unauthorized(DDMError, PermissionError):
    """Missing or wrong API key (401), or an action that is disabled for this deployment (403)."""

    code = "unauthorized"

    def __init__(self, message: str, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden


class EngineFailure(DDMError, RuntimeError):
    """The model failed on a batch; only that batch's requests fail (500)."""

    code = "engine_error"


class DeviceOutOfMemory(EngineFailure):
    """The device ran out of memory on a batch; the batcher splits the batch and retries."""

    code = "device_oom"
