"""Errors that carry their HTTP status.

Code raises these; the ingress maps every one of them to a response with the
same shape FastAPI uses for validation errors, so clients parse one format:
``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``.
"""

from http import HTTPStatus


class MaasError(Exception):
    """Base class: an error a client can act on."""

    status_code: int = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: str = "internal_error"

    def __init__(self, message: str, *, field: str | tuple | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def detail(self) -> list[dict]:
        # A field name, or a path to one (("messages", 0, "content", 1)).
        path = list(self.field) if isinstance(self.field, tuple) else [self.field] if self.field else []
        loc = ["body", *path]
        return [{"loc": loc, "msg": self.message, "type": self.error_type}]

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidInput(MaasError):
    """The request is well-formed but a value in it is unusable."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    error_type = "invalid_input"


class InvalidImage(InvalidInput):
    """The image bytes are not a decodable image of a supported format."""

    error_type = "invalid_image"


class InvalidAudio(InvalidInput):
    """The bytes are not decodable audio of a supported container, or are truncated or corrupt."""

    error_type = "invalid_audio"


class UnsupportedAudio(InvalidInput):
    """Audio whose sample rate or channel count is out of the accepted bounds."""

    error_type = "unsupported_audio"


class EmptyAudio(InvalidInput):
    """Audio that holds no samples, or only silence."""

    error_type = "empty_audio"


class PolicyBlocked(MaasError):
    """A rule of the policy the caller chose refused the request; the rule is named, never its condition."""

    status_code = HTTPStatus.FORBIDDEN
    error_type = "policy_blocked"

    def __init__(self, policy: str, rule: str):
        super().__init__(f"refused by rule {rule!r} of policy {policy!r}", field="policy")
        self.policy, self.rule = policy, rule


class PayloadTooLarge(MaasError):
    """The body or the image is larger than the configured limits."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    error_type = "payload_too_large"


class AudioTooLong(PayloadTooLarge):
    """Audio longer than the limit, by the duration its file states or by what it decodes to."""

    error_type = "audio_too_long"


class UnsupportedMediaType(MaasError):
    """The request's Content-Type is not one the route accepts."""

    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    error_type = "unsupported_media_type"


class RetryLater(MaasError):
    """The service cannot take this request now; the same request may succeed after ``Retry-After``."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, retryable: bool = False):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.retryable = retryable  # whether the ingress may make the same model calls again at once

    def detail(self) -> list[dict]:
        return [{"loc": [], "msg": self.message, "type": self.error_type}]

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(RetryLater):
    """More requests are in flight than the service admits; refused before any work was done."""

    error_type = "overloaded"


class ModelUnavailable(RetryLater):
    """A model deployment the request needs has no replica able to answer within the request's deadline."""

    error_type = "model_unavailable"


class ModelTimeout(MaasError):
    """A model started answering but did not finish within the request's deadline."""

    status_code = HTTPStatus.GATEWAY_TIMEOUT
    error_type = "timeout"


class IngressFailed(MaasError):
    """The HTTP ingress (HAProxy) got no valid answer from the ingress replica it sent the request to: the
    replica went away or broke the connection mid-answer (502)."""

    status_code = HTTPStatus.BAD_GATEWAY
    error_type = "bad_gateway"

    def detail(self) -> list[dict]:
        return [{"loc": [], "msg": self.message, "type": self.error_type}]


class IngressTimeout(ModelTimeout):
    """The HTTP ingress (HAProxy) waited longer than its server timeout for the ingress replica's answer (504)."""

    def detail(self) -> list[dict]:
        return [{"loc": [], "msg": self.message, "type": self.error_type}]


# Errors that model replicas raise are defined here, beside the rest, and not in the model's module: the
# ingress unpickles them by their module, and a model's module imports torch (3 s and hundreds of MB in an
# ingress replica that otherwise runs without it).


class ExplanationTimeout(ModelTimeout):
    """An explanation ran past its time budget (504): the replica stopped working on it."""

    error_type = "explanation_timeout"


class PromptTooLong(InvalidInput):
    """A prompt has more tokens than the language model takes (400)."""

    error_type = "context_length_exceeded"


class ConfigError(ValueError):
    """A deployment or application config is invalid; raised at build time."""


class Unauthorized(MaasError):
    """No API key, or one the service does not know (RFC 6750: ``WWW-Authenticate: Bearer``)."""

    status_code = HTTPStatus.UNAUTHORIZED
    error_type = "invalid_api_key"

    def __init__(self, message: str, *, presented: bool):
        super().__init__(message)
        self.presented = presented

    def detail(self) -> list[dict]:
        return [{"loc": ["header", "authorization"], "msg": self.message, "type": self.error_type}]

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="maas-cluster"'
        return {"WWW-Authenticate": challenge + (', error="invalid_token"' if self.presented else "")}


class Forbidden(MaasError):
    """A valid key without the scope the request needs."""

    status_code = HTTPStatus.FORBIDDEN
    error_type = "insufficient_scope"

    def detail(self) -> list[dict]:
        return [{"loc": [], "msg": self.message, "type": self.error_type}]

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="maas-cluster", error="insufficient_scope"'}


class RateLimited(MaasError):
    """The key sent more than its rate limit allows; the same request may succeed after ``Retry-After``."""

    status_code = HTTPStatus.TOO_MANY_REQUESTS
    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def detail(self) -> list[dict]:
        return [{"loc": [], "msg": self.message, "type": self.error_type}]

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}
