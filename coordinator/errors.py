"""Typed errors of the coordinator's handlers, independent of the transport.

Each class names the gRPC status code it maps to (``code``); the servicers turn them
into statuses, other transports (in-process tests, a future HTTP front end) can map
them their own way. ``reason`` is a short machine label used for metrics.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(message)
        self.message = message
        self.reason = reason


class InvalidArgument(CoordinatorError):
    code = "INVALID_ARGUMENT"


class Unauthenticated(CoordinatorError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CoordinatorError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(CoordinatorError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(CoordinatorError):
    code = "RESOURCE_EXHAUSTED"


class AlreadyExists(CoordinatorError):
    code = "ALREADY_EXISTS"


class NotFound(CoordinatorError):
    code = "NOT_FOUND"


class Unavailable(CoordinatorError):
    code = "UNAVAILABLE"


class StoreError(RuntimeError):
    """The store on disk cannot be used (corrupt, foreign, or of another run)."""


class DeadlineExceeded(CoordinatorError):
    code = "DEADLINE_EXCEEDED"
