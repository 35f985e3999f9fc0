"""The gateway's error tree: every failure a partner can see, with its status and contract code.

Domain code raises these; one middleware (``middleware.py``) renders them as the contract's JSON
error. The tree branches by who has to act::

    GatewayError (500 internal_error)
    ├── PartnerError            4xx: the partner can fix the request
    │   ├── InvalidJsonError, UnauthorizedError, WrongHostError, RequestTimeoutError, ...
    │   ├── InvalidSignatureError              a Manager webhook that does not verify
    │   ├── ForbiddenError                     a console action without the operator's session
    │   ├── ValidationFailedError              (details: one entry per problem)
    │   ├── PrescriptionPdf{Invalid,Unreachable,Blocked}Error
    │   └── UpstreamRejectedError              Manager refused the order (Manager's status)
    ├── UpstreamError           5xx: the operator or Manager has to act
    │   ├── UpstreamAuthFailedError, UpstreamUnavailableError, UpstreamTimeoutError
    │   └── StateUnavailableError
    └── ConfigError             start-up and reload only; the CLI exits 2

Messages are one sentence and never carry a key, token, customer data or PDF bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

Detail = Mapping[str, object]


class GatewayError(Exception):
    """Root of everything the gateway reports; unexpected bugs are rendered as this class."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = (
        "An internal error occurred; it was logged with the request id."
    )
    # True where the rest of the request cannot be trusted to follow (a body cut off mid-way).
    closes_connection: ClassVar[bool] = False

    def __init__(
        self,
        message: str | None = None,
        *,
        details: list[Detail] | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.headers: dict[str, str] = dict(headers or {})
        self._status = status
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        """The status to answer with: the class's, unless this instance was given its own."""
        return self._status or self.status


class PartnerError(GatewayError):
    """The partner's request cannot be processed as sent; the message is safe to show."""

    status = 400
    code = "bad_request"


class InvalidJsonError(PartnerError):
    code = "invalid_json"
    default_message = "The body is not a JSON object."


class UnauthorizedError(PartnerError):
    status = 401
    code = "unauthorized"
    default_message = "The API key is missing or not valid."


class InvalidSignatureError(PartnerError):
    """A Manager webhook whose signature does not verify with a subscribed org's secret."""

    status = 401
    code = "invalid_signature"
    default_message = "The webhook signature is missing or does not verify."


class WrongHostError(PartnerError):
    status = 403
    code = "wrong_host"
    default_message = "This key is not valid for the shop served at this address."


class ShopMismatchError(PartnerError):
    status = 403
    code = "shop_mismatch"
    default_message = "The body names a shop or organisation other than the key's."


class ForbiddenError(PartnerError):
    """An operator console action without the operator's session (or with a stale form)."""

    status = 403
    code = "forbidden"
    default_message = "This console action needs the operator's token; log in first."


class NotFoundError(PartnerError):
    status = 404
    code = "not_found"
    default_message = "There is nothing at this path; orders go to POST /api/v1/external-order."


class MethodNotAllowedError(PartnerError):
    status = 405
    code = "method_not_allowed"
    default_message = (
        "This method is not allowed on this path; the Allow header names those that are."
    )


class RequestTimeoutError(PartnerError):
    """The body did not arrive within ``server.read_timeout_s``; the connection is closed after."""

    status = 408
    code = "request_timeout"
    default_message = "The request body did not arrive in time."
    closes_connection = True


class IdempotencyConflictError(PartnerError):
    status = 409
    code = "idempotency_conflict"
    default_message = "This external_reference was already used with a different order."


class RequestInProgressError(PartnerError):
    status = 409
    code = "request_in_progress"
    default_message = "An order with this external_reference is still being processed; retry later."


class PayloadTooLargeError(PartnerError):
    status = 413
    code = "payload_too_large"
    default_message = "The request body is larger than this gateway accepts."


class UnsupportedMediaTypeError(PartnerError):
    status = 415
    code = "unsupported_media_type"
    default_message = "Send application/json or multipart/form-data."


class ValidationFailedError(PartnerError):
    status = 422
    code = "validation_failed"
    default_message = "The order is not valid; see details."


class PrescriptionPdfInvalidError(PartnerError):
    status = 422
    code = "prescription_pdf_invalid"
    default_message = "The prescription is not a valid PDF."


class PrescriptionPdfUnreachableError(PartnerError):
    status = 422
    code = "prescription_pdf_unreachable"
    default_message = "The prescription PDF could not be fetched."


class PrescriptionPdfBlockedError(PartnerError):
    status = 422
    code = "prescription_pdf_blocked"
    default_message = "The prescription PDF URL points where this gateway does not fetch from."


class RateLimitedError(PartnerError):
    status = 429
    code = "rate_limited"
    default_message = "Too many requests for this partner; retry after the given delay."

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})
        self.retry_after_s = max(1, retry_after_s)


class UpstreamRejectedError(PartnerError):
    """Manager refused the order itself (400/404/409/422): its status and body pass through."""

    code = "upstream_rejected"
    default_message = "Manager rejected the order request; see details."

    def __init__(self, upstream_status: int, body: Detail, message: str | None = None) -> None:
        super().__init__(message, details=[body], status=upstream_status)


class UpstreamError(GatewayError):
    """Manager could not be used; the operator (or Manager) has to act, the partner may retry."""

    status = 502
    code = "upstream_unavailable"
    default_message = "Manager could not be reached; the order was not delivered."


class UpstreamAuthFailedError(UpstreamError):
    code = "upstream_auth_failed"
    default_message = (
        "Manager refused this shop's credentials; the order was not delivered and the operator "
        "has to act."
    )


class UpstreamUnavailableError(UpstreamError):
    code = "upstream_unavailable"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int = 502,
        retry_after_s: int | None = None,
    ) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        super().__init__(message, headers=headers, status=status)


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"
    default_message = "Manager did not answer in time; the order may not have been delivered."


class StateUnavailableError(UpstreamError):
    status = 503
    code = "state_unavailable"
    default_message = "The shared state store is unreachable; nothing was forwarded."


class ConfigError(GatewayError, ValueError):
    """The configuration file or a secret it names is not usable (start-up and reload only)."""

    code = "config_error"
    default_message = "The configuration is not valid."
