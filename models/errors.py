"""Named errors. Each message says what failed and how to fix it.

The HTTP layer maps these to status codes in one place (the ingress); the CLI maps them to exit code 2.
"""

from __future__ import annotations


class RecserveError(Exception):
    """Base class: an expected failure with a message fit for a user."""


class ConfigError(RecserveError):
    """A setting or argument is invalid."""


class DataError(RecserveError):
    """The input data is missing or unusable."""


class CutoffError(DataError):
    """The requested cutoff date leaves no usable training or holdout window."""


class BundleError(RecserveError):
    """A model bundle cannot be used."""


class BundleNotFoundError(BundleError):
    """No bundle at the given path."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, altered or does not match the manifest."""


class BundleStoreError(BundleError):
    """The object store holding a bundle cannot be reached or refuses the request."""


class SchemaMismatchError(BundleError):
    """The bundle's feature schema differs from the one this code computes."""


class FeatureStoreError(RecserveError):
    """The feature store cannot serve or accept a request."""

    retryable = False


class StoreUnavailableError(FeatureStoreError):
    """Redis does not answer or failed mid-operation; nothing was half-written, so the caller may retry."""

    retryable = True


class WriteConflictError(FeatureStoreError):
    """Another writer held a user's event lock for too long; the caller may retry."""

    retryable = True


class NotMaterializedError(FeatureStoreError):
    """The bundle's batch features are not in the online store."""


class InvalidEventError(RecserveError):
    """An event in a batch is malformed; `index` and `field` say which one and where."""

    def __init__(self, index: int | None, field: str, message: str) -> None:
        self.index = index
        self.field = field
        where = f"events[{index}].{field}" if index is not None else field
        super().__init__(f"{where}: {message}")


class RequestError(RecserveError):
    """The HTTP edge refuses a request before any work; `field` names the part at fault (None: the whole request)
    and `headers` are sent with the answer (Allow, Accept-Encoding, Connection)."""

    def __init__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.field = field
        self.headers = headers or {}
        super().__init__(message)


class MalformedBodyError(RequestError):
    """The body is not what its headers say: not UTF-8, not JSON, not gzip."""


class InvalidRequestError(RequestError):
    """The body is JSON but a field breaks the request's schema (type, range, unknown field)."""


class IntegerTooLongError(RequestError):
    """A JSON integer has more digits than Python reads (sys.get_int_max_str_digits, 4,300 by default)."""


class BodyTooLargeError(RequestError):
    """The body is over the size limit, as sent or once decoded."""


class BodyTimeoutError(RequestError):
    """The body did not arrive within the read deadline."""


class UnsupportedMediaTypeError(RequestError):
    """A Content-Type or Content-Encoding the service does not read."""


class RouteNotFoundError(RequestError):
    """No route has this path."""


class MethodNotAllowedError(RequestError):
    """The path exists, but not for this method."""


class ItemNotFoundError(RequestError):
    """The item is not in the bundle's catalog."""


class OverloadedError(RequestError):
    """The replica is at its in-flight limit; the caller may retry after a second."""

    retryable = True


class UnauthorizedError(RequestError):
    """No API key, or one that matches no configured key (or none is configured): the caller must authenticate.
    Sent with `WWW-Authenticate: Bearer`."""

    def __init__(self, message: str, invalid: bool = False) -> None:
        # RFC 6750 section 3: `error="invalid_token"` when a key was sent but is not one of ours.
        challenge = 'Bearer realm="recserve"' + (', error="invalid_token"' if invalid else "")
        super().__init__(message, "Authorization", {"WWW-Authenticate": challenge})


class ForbiddenError(RequestError):
    """A valid API key without the scope the route needs; `scope` names it."""

    def __init__(self, message: str, scope: str) -> None:
        self.scope = scope
        challenge = f'Bearer realm="recserve", error="insufficient_scope", scope="{scope}"'
        super().__init__(message, "Authorization", {"WWW-Authenticate": challenge})
