"""HTTP and CloudEvent plumbing shared by every Cloud Function (no TensorFlow here).

HTTP functions:
- :func:`parse_message` reads a protobuf request body, binary (``application/x-protobuf``)
  or JSON (the protobuf JSON mapping), with a size limit;
- :func:`message_response` answers in the format the caller asked for (``Accept``), else
  in the format it sent;
- :func:`error_response` turns a :mod:`fedcompute.errors` exception into a status code
  and a JSON body ``{"error": {"code", "status", "message"}}``;
- :class:`Router` dispatches on method + path regex and answers 404/405 with reasons;
- :func:`require_api_key` checks the ``x-api-key`` header.

CloudEvent functions:
- :func:`decode_pubsub_event` unwraps a Pub/Sub ``messagePublished`` event;
- :func:`storage_object_from_event` reads the object of a GCS finalize event, whether it
  arrives directly (Eventarc) or as a Pub/Sub notification (fake-gcs-server locally);
- :func:`is_health_event` recognises the stack's health probes (type
  :data:`HEALTH_EVENT_TYPE`, or a Pub/Sub message whose ``event_type`` attribute is it).
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from fedcompute import __version__, layout, strict_json
from fedcompute.errors import (
    RETRY_AFTER_S,
    FedComputeError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    TransientError,
    UnauthenticatedError,
    as_transient,
    http_status_for,
)
from fedcompute.logs import add_labels, configure_json_logging, log_context

if TYPE_CHECKING:  # flask is imported where responses are built: the stack manager imports this module
    import flask

logger = logging.getLogger(__name__)

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
JSON_CONTENT_TYPE = "application/json"
# Content types read as binary protobuf. ODP clients send application/x-protobuf.
PROTOBUF_CONTENT_TYPES = frozenset({PROTOBUF_CONTENT_TYPE, "application/protobuf", "application/octet-stream"})
# 32 MiB is the Cloud Functions request limit; handlers pass smaller limits where they can.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
API_KEY_HEADER = "x-api-key"
TRACE_HEADER = "X-Cloud-Trace-Context"

HEALTH_EVENT_TYPE = "dev.fedcompute.health.v1"
HEALTH_EVENT_SOURCE = "//fedcompute.dev/stack"
# Pub/Sub attribute naming the kind of event a message carries; a message whose value is
# HEALTH_EVENT_TYPE is a health probe sent through the topic (checks the push wiring).
EVENT_TYPE_ATTRIBUTE = "event_type"
PUBSUB_MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
STORAGE_OBJECT_FINALIZED = "google.cloud.storage.object.v1.finalized"

M = TypeVar("M", bound=Message)
Handler = Callable[..., Any]

# Google API status names for the HTTP codes our errors use.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class UnsupportedMediaTypeError(InvalidRequestError):
    """The body's Content-Type is neither protobuf nor JSON (HTTP 415)."""

    http_status = 415


class MethodNotAllowedError(InvalidRequestError):
    """The path exists but not for this HTTP method (HTTP 405)."""

    http_status = 405

    def __init__(self, message: str, *, allowed: tuple[str, ...], hint: str | None = None) -> None:
        self.allowed = allowed
        super().__init__(message, hint=hint)


# --------------------------------------------------------------------------- requests


def _media_type(value: str | None) -> str:
    """``"application/json; charset=utf-8"`` -> ``"application/json"``."""
    return (value or "").split(";", 1)[0].strip().lower()


def _is_json_type(media_type: str) -> bool:
    return media_type == JSON_CONTENT_TYPE or media_type.endswith("+json")


def read_body(request: flask.Request, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The request body, refusing bodies over ``max_bytes`` before reading them whole."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLargeError(
            f"request body is {length} bytes; {request.method} {request.path} accepts at most {max_bytes} bytes",
            hint="send a smaller body (large data goes to Cloud Storage, not in requests)",
        )
    if length is not None:
        return request.get_data(cache=True)
    # No Content-Length (chunked): read one byte past the limit to detect an overflow.
    data = request.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"request body is larger than {max_bytes} bytes, the limit for {request.method} {request.path}",
            hint="send a smaller body (large data goes to Cloud Storage, not in requests)",
        )
    return data


def parse_message(request: flask.Request, message_cls: type[M], *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Parse the body of ``request`` as a ``message_cls``.

    Binary protobuf for ``application/x-protobuf`` (also ``application/protobuf`` and
    ``application/octet-stream``), the protobuf JSON mapping for ``application/json``.
    Without a Content-Type, a body starting with ``{`` is read as JSON, anything else as
    binary. An empty body is the empty message. Unknown JSON fields are errors, so typos
    are reported instead of silently ignored.

    Raises:
        PayloadTooLargeError: the body is over ``max_bytes``.
        UnsupportedMediaTypeError: the Content-Type is neither protobuf nor JSON.
        InvalidRequestError: the body does not parse as ``message_cls``.
    """
    name = message_cls.DESCRIPTOR.full_name
    media_type = _media_type(request.headers.get("Content-Type"))
    data = read_body(request, max_bytes=max_bytes)
    if not media_type:
        media_type = JSON_CONTENT_TYPE if data.lstrip()[:1] == b"{" else PROTOBUF_CONTENT_TYPE
    message = message_cls()
    if not data.strip():
        return message
    if media_type in PROTOBUF_CONTENT_TYPES:
        try:
            message.ParseFromString(data)
        except DecodeError as error:
            raise InvalidRequestError(
                f"body is not a valid binary {name} ({error})",
                hint=f"send Content-Type: {JSON_CONTENT_TYPE} if the body is JSON",
            ) from error
        return message
    if _is_json_type(media_type):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequestError(
                f"JSON body is not UTF-8 (byte {error.start})",
                hint=f"send Content-Type: {PROTOBUF_CONTENT_TYPE} for a binary protobuf body",
            ) from error
        try:
            json_format.Parse(text, message)
        except RecursionError as error:  # json.loads on e.g. 25,000 nested arrays
            raise InvalidRequestError(f"JSON body for {name} is nested too deeply",
                                      hint="send the protobuf JSON mapping of the message") from error
        except json_format.ParseError as error:
            raise InvalidRequestError(
                f"invalid JSON for {name}: {error}",
                hint="field names follow the protobuf JSON mapping (lowerCamelCase or the .proto names)",
            ) from error
        return message
    raise UnsupportedMediaTypeError(
        f"unsupported Content-Type {media_type!r} for {name}",
        hint=f"send {PROTOBUF_CONTENT_TYPE} (binary protobuf) or {JSON_CONTENT_TYPE} (protobuf JSON mapping)",
    )


def wants_protobuf(request: flask.Request | None) -> bool:
    """Whether a response to ``request`` should be binary protobuf rather than JSON.

    An ``Accept`` header naming protobuf or JSON explicitly decides (highest quality
    wins). Otherwise (no Accept, ``*/*``, or Java's default ``text/html, image/gif,
    ..., */*; q=.2``) the response mirrors the request's Content-Type; JSON is the
    default (readable with curl).
    """
    if request is None:
        return False
    mirrored = _media_type(request.headers.get("Content-Type")) in PROTOBUF_CONTENT_TYPES
    named = {_media_type(value): quality for value, quality in request.accept_mimetypes}
    protobuf_q = max((q for t, q in named.items() if t in PROTOBUF_CONTENT_TYPES), default=0.0)
    json_q = max((q for t, q in named.items() if _is_json_type(t)), default=0.0)
    if protobuf_q == json_q:  # neither named, or a tie
        return mirrored
    return protobuf_q > json_q


def message_response(
    message: Message,
    status: int = 200,
    request: flask.Request | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> flask.Response:
    """``message`` as binary protobuf or JSON, whichever ``request`` asks for (see :func:`wants_protobuf`)."""
    import flask

    body: bytes | str
    if wants_protobuf(request):
        body, content_type = message.SerializeToString(), PROTOBUF_CONTENT_TYPE
    else:
        body, content_type = json_format.MessageToJson(message, indent=None), JSON_CONTENT_TYPE
    response = flask.Response(body, status=status, content_type=content_type)
    response.headers["Vary"] = "Accept, Content-Type"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def json_response(payload: Mapping[str, Any], status: int = 200, *, headers: Mapping[str, str] | None = None) -> flask.Response:
    """A plain JSON response (health checks, errors)."""
    import flask

    response = flask.Response(strict_json.dumps(payload, sort_keys=True), status=status, content_type=JSON_CONTENT_TYPE)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def status_name(code: int) -> str:
    """Google API status name for an HTTP code (``404`` -> ``"NOT_FOUND"``)."""
    if code in _STATUS_NAMES:
        return _STATUS_NAMES[code]
    try:
        return HTTPStatus(code).phrase.upper().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "UNKNOWN"


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status code, {"error": {"code", "status", "message"}})`` for ``error``.

    Unknown exceptions become 500 with a generic message: their text may leak internals,
    so it goes to the log (see :func:`error_response`), not to the caller.
    """
    error = as_transient(error) or error
    code = http_status_for(error)
    message = str(error) if isinstance(error, FedComputeError) else f"internal error ({type(error).__name__}); see the function's log"
    return code, {"error": {"code": code, "status": status_name(code), "message": message}}


def error_response(error: BaseException) -> flask.Response:
    """JSON error response for ``error``; logs 5xx errors with their traceback.

    A dependency outage is a 503 with ``Retry-After`` (devices and clients come back later).
    """
    code, body = error_body(error)
    if code >= 500:
        logger.error("request failed: %s", error, exc_info=error)
    else:
        logger.info("request rejected (%d): %s", code, error)
    headers = {}
    if isinstance(error, MethodNotAllowedError):
        headers["Allow"] = ", ".join(error.allowed)
    if code == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif code == 429:
        headers["Retry-After"] = str(getattr(error, "retry_after_s", RETRY_AFTER_S))
    return json_response(body, code, headers=headers)


def require_api_key(request: flask.Request, expected: str) -> None:
    """Check the ``x-api-key`` header against ``expected`` (constant time).

    An empty ``expected`` (a local stack without a key) lets only loopback callers in: an
    operator API reachable from other machines always needs a key.

    Raises:
        UnauthenticatedError: the header is missing or does not match, or no key is
            configured and the caller is not on this machine.
    """
    if not expected:
        if not _is_loopback_address(request.remote_addr):
            raise UnauthenticatedError(
                f"this operator API has no API key configured, so it only answers callers on this machine "
                f"(not {request.remote_addr})",
                hint="set FEDCOMPUTE_API_KEY on the server and send it in the x-api-key header",
            )
        return
    given = request.headers.get(API_KEY_HEADER)
    if not given:
        raise UnauthenticatedError(
            f"missing {API_KEY_HEADER} header",
            hint="pass the API key configured in FEDCOMPUTE_API_KEY",
        )
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise UnauthenticatedError(
            f"invalid {API_KEY_HEADER}",
            hint="use the key configured in FEDCOMPUTE_API_KEY on the server",
        )


def _is_loopback_address(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- routing

_ID_PARAMS = ("task_id", "round_number")


def check_path_params(params: Mapping[str, str | None]) -> None:
    """400 for path parameters the patterns let through but the services cannot take.

    ``population`` must be a valid population name (:func:`fedcompute.layout.population_name_problem`);
    ``task_id`` / ``round_number`` at most 18 ASCII digits (an int64; Python's ``int`` of a
    4,301-digit string raises).
    """
    from fedcompute import layout

    population = params.get("population")
    if population is not None:
        problem = layout.population_name_problem(population)
        if problem:
            raise InvalidRequestError(problem, hint="use the population_name of the task config")
    for name in _ID_PARAMS:
        value = params.get(name)
        if value is not None and not layout.is_ascii_decimal(value):
            raise InvalidRequestError(f"{name} {value[:40]!r} is not a decimal id of at most "
                                      f"{layout.MAX_ID_DIGITS} digits")


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler

    @property
    def template(self) -> str:
        return self.pattern.pattern


class Router:
    """Method + path-regex routing for one HTTP function.

    Patterns must match the whole path; named groups become keyword arguments of the
    handler: ``handler(request, **groups)``. Handlers return a flask response (or
    anything flask accepts) and raise :mod:`fedcompute.errors` exceptions, which
    :meth:`dispatch` turns into JSON error responses.
    """

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name
        self._routes: list[Route] = []

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register ``handler`` for ``method`` on paths fully matching ``pattern``."""
        self._routes.append(Route(method.upper(), re.compile(pattern), handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`."""

        def decorate(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler

        return decorate

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters for ``method path``.

        Raises:
            NotFoundError: no route matches the path.
            MethodNotAllowedError: routes match the path, but not with this method.
        """
        allowed: list[str] = []
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if route.method == method.upper():
                params = match.groupdict()
                check_path_params(params)
                return route.handler, params
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowedError(
                f"{method} is not allowed on {path} ({self.function_name}); allowed: {', '.join(sorted(set(allowed)))}",
                allowed=tuple(sorted(set(allowed))),
            )
        known = "; ".join(f"{r.method} {r.template}" for r in self._routes)
        raise NotFoundError(
            f"no route for {method} {path} on {self.function_name}",
            hint=f"known routes: {known}" if known else "this function has no routes",
        )

    def dispatch(self, request: flask.Request) -> Any:
        """Run the handler for ``request``; errors become JSON error responses.

        Log lines written meanwhile carry the request's trace and its population / task /
        round / assignment labels (see :mod:`fedcompute.logs`).
        """
        started = time.perf_counter()
        with log_context(trace_header=request.headers.get(TRACE_HEADER)):
            try:
                handler, params = self.resolve(request.method, request.path)
                add_labels(population=params.get("population"), task=params.get("task_id"),
                           round=params.get("round_number"), assignment=params.get("assignment_id"))
                return handler(request, **params)
            except Exception as error:  # noqa: BLE001 - every failure must become a response
                return error_response(error)
            finally:
                logger.debug("%s %s took %.1f ms", request.method, request.path,
                             1000 * (time.perf_counter() - started))


def health_payload(function_name: str, **extra: Any) -> dict[str, Any]:
    """Body of ``GET /healthz``: status, function name, version, pid, project."""
    payload: dict[str, Any] = {
        "status": "ok",
        "function": function_name,
        "version": __version__,
        "pid": os.getpid(),
        "project": os.environ.get("FEDCOMPUTE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT", ""),
    }
    payload.update(extra)
    return payload


# --------------------------------------------------------------------------- CloudEvents


class PubSubMessage(NamedTuple):
    """A decoded Pub/Sub message; unpacks as ``data, attributes, message_id``."""

    data: bytes
    attributes: dict[str, str]
    message_id: str


def _event_attr(cloud_event: Any, name: str, default: Any = None) -> Any:
    try:
        return cloud_event[name]
    except (KeyError, TypeError):
        return default


def _event_data(cloud_event: Any) -> Any:
    data = getattr(cloud_event, "data", None)
    if isinstance(data, (bytes, bytearray)):
        try:
            data = json.loads(data)
        except ValueError:
            return data
    return data


def decode_pubsub_event(cloud_event: Any) -> PubSubMessage:
    """``(data bytes, attributes, message id)`` of a Pub/Sub ``messagePublished`` CloudEvent.

    Accepts the Eventarc shape and what functions-framework makes of a push
    subscription's body: ``data = {"message": {"data": base64, "attributes": {...},
    "messageId": ...}, ...}``.

    Raises:
        InvalidRequestError: the event does not carry a Pub/Sub message.
    """
    event_type = _event_attr(cloud_event, "type", "?")
    data = _event_data(cloud_event)
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, dict):
        raise InvalidRequestError(
            f"event {_event_attr(cloud_event, 'id', '?')} of type {event_type} carries no Pub/Sub message",
            hint=f"this function expects {PUBSUB_MESSAGE_PUBLISHED} events (a push subscription or Eventarc trigger)",
        )
    encoded = message.get("data") or ""
    try:
        payload = base64.b64decode(encoded, validate=True) if encoded else b""
    except (ValueError, TypeError) as error:
        raise InvalidRequestError(f"Pub/Sub message data is not base64 ({error})") from error
    attributes = {str(k): str(v) for k, v in (message.get("attributes") or {}).items()}
    message_id = str(message.get("messageId") or message.get("message_id") or _event_attr(cloud_event, "id", ""))
    return PubSubMessage(payload, attributes, message_id)


class StorageObject(NamedTuple):
    """Bucket, name and generation of a finalized Cloud Storage object."""

    bucket: str
    name: str
    generation: str
    size: int = 0


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def storage_object_from_event(cloud_event: Any) -> StorageObject | None:
    """The object of an OBJECT_FINALIZE event, or ``None`` for other storage events.

    Works for a direct Eventarc ``google.cloud.storage.object.v1.finalized`` event (data
    is the object resource) and for a Pub/Sub notification (attributes ``eventType``,
    ``bucketId``, ``objectId``, ``objectGeneration``), as fake-gcs-server sends locally.

    Raises:
        InvalidRequestError: the event is neither.
    """
    if _event_attr(cloud_event, "type") == STORAGE_OBJECT_FINALIZED:
        data = _event_data(cloud_event)
        if not isinstance(data, dict) or not data.get("bucket") or not data.get("name"):
            raise InvalidRequestError("storage event without bucket/name in its data")
        return StorageObject(str(data["bucket"]), str(data["name"]), str(data.get("generation", "")),
                             _int(data.get("size")))
    payload, attributes, _ = decode_pubsub_event(cloud_event)
    if attributes.get("eventType") != "OBJECT_FINALIZE":
        return None
    bucket, name = attributes.get("bucketId"), attributes.get("objectId")
    if not bucket or not name:
        raise InvalidRequestError(
            "OBJECT_FINALIZE notification without bucketId/objectId attributes",
            hint="notifications must use payload format JSON_API_V1",
        )
    size = 0
    try:  # JSON_API_V1 notifications carry the object resource as the payload
        size = _int(json.loads(payload).get("size")) if payload else 0
    except (ValueError, AttributeError):
        size = 0
    return StorageObject(bucket, name, attributes.get("objectGeneration", ""), size)


def is_health_event(cloud_event: Any) -> bool:
    """Whether ``cloud_event`` is a health probe rather than real work.

    Either a CloudEvent of type :data:`HEALTH_EVENT_TYPE` (posted directly by the stack
    manager) or a Pub/Sub message whose ``event_type`` attribute is that type (published
    to a topic to check the push subscription reaches the function).
    """
    event_type = _event_attr(cloud_event, "type")
    if event_type == HEALTH_EVENT_TYPE:
        return True
    if event_type != PUBSUB_MESSAGE_PUBLISHED:
        return False
    data = _event_data(cloud_event)
    message = data.get("message") if isinstance(data, dict) else None
    attributes = message.get("attributes") if isinstance(message, dict) else None
    return isinstance(attributes, dict) and attributes.get(EVENT_TYPE_ATTRIBUTE) == HEALTH_EVENT_TYPE


def health_event_headers(event_id: str, source: str = HEALTH_EVENT_SOURCE) -> dict[str, str]:
    """Binary-mode CloudEvent headers of a health probe (POST them with a JSON body)."""
    return {
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": HEALTH_EVENT_TYPE,
        "ce-specversion": "1.0",
        "Content-Type": JSON_CONTENT_TYPE,
    }


def log_health_event(function_name: str, cloud_event: Any) -> None:
    """Log a health probe in a fixed format (tests and the stack grep for it)."""
    logger.info(
        "health event received by %s: id=%s type=%s source=%s",
        function_name,
        _event_attr(cloud_event, "id", "?"),
        _event_attr(cloud_event, "type", "?"),
        _event_attr(cloud_event, "source", "?"),
    )


def dispatch_event(function_name: str, cloud_event: Any, handler: Callable[[Any], None]) -> None:
    """Run ``handler(cloud_event)`` with the Pub/Sub error convention.

    Health probes are logged and acknowledged without calling ``handler``.
    :class:`~fedcompute.errors.TransientError` and unexpected exceptions propagate
    (functions-framework answers 500, Pub/Sub redelivers, and after the subscription's
    max delivery attempts the message lands in the dead-letter topic). Other
    :class:`~fedcompute.errors.FedComputeError` are permanent: logged and acknowledged,
    since redelivering them cannot succeed.
    """
    if is_health_event(cloud_event):
        log_health_event(function_name, cloud_event)
        return
    with log_context(**event_labels(cloud_event)):
        _dispatch_event(function_name, cloud_event, handler)


def event_labels(cloud_event: Any) -> dict[str, Any]:
    """Log labels of an event: the round event's JSON fields, or the parts of a gradient object's name."""
    try:
        obj = storage_object_from_event(cloud_event)
        if obj is not None:
            parsed = layout.parse_gradient_path(obj.name)
            return {} if parsed is None else {"population": parsed.population, "task": parsed.task_id,
                                              "round": parsed.round_number, "assignment": parsed.assignment_id}
        payload = json.loads(decode_pubsub_event(cloud_event).data or b"{}")
    except (FedComputeError, ValueError, TypeError, AttributeError):
        return {}
    if not isinstance(payload, dict):
        return {}
    return {"population": payload.get("population"), "task": payload.get("task_id"), "round": payload.get("round")}


def _dispatch_event(function_name: str, cloud_event: Any, handler: Callable[[Any], None]) -> None:
    event_id = _event_attr(cloud_event, "id", "?")
    # One line per delivery (like Cloud Functions' invocation log): ties a Pub/Sub
    # message id to the function that processed it.
    logger.info(
        "event received by %s: id=%s type=%s source=%s",
        function_name, event_id, _event_attr(cloud_event, "type", "?"), _event_attr(cloud_event, "source", "?"),
    )
    try:
        handler(cloud_event)
    except TransientError as error:
        logger.warning("%s: event %s failed transiently, will be redelivered: %s", function_name, event_id, error)
        raise
    except FedComputeError as error:
        logger.error("%s: event %s rejected permanently (acknowledged): %s", function_name, event_id, error)


def configure_logging(level: int = logging.INFO) -> None:
    """Log INFO and above as JSON lines on stdout (idempotent); see :mod:`fedcompute.logs`.

    Functions call this at import; Cloud Logging parses the lines (severity, labels,
    trace), and the local stack's log files capture them.
    """
    configure_json_logging(level)
