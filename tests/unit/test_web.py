"""fedcompute.web: content negotiation, errors, routing, API key, CloudEvent decoding."""
from __future__ import annotations

import base64
import io
import json

import flask
import pytest
from cloudevents.http import CloudEvent
from google.protobuf import descriptor_pb2

from fedcompute import errors, web

# A stable protobuf message with strings, ints and an enum (JSON names differ: type_name -> typeName).
Field = descriptor_pb2.FieldDescriptorProto

app = flask.Flask(__name__)


def make_field() -> Field:
    return Field(name="report_goal", number=7, type=Field.TYPE_INT64, type_name="x.Y", json_name="reportGoal")


def request_ctx(method: str = "POST", path: str = "/", **kwargs):
    return app.test_request_context(path, method=method, **kwargs)


# --------------------------------------------------------------------------- parse_message


def test_parse_binary_protobuf() -> None:
    msg = make_field()
    with request_ctx(data=msg.SerializeToString(), content_type="application/x-protobuf"):
        assert web.parse_message(flask.request, Field) == msg


@pytest.mark.parametrize("body", [
    '{"name": "report_goal", "number": 7, "type": "TYPE_INT64", "typeName": "x.Y", "jsonName": "reportGoal"}',
    '{"name": "report_goal", "number": 7, "type": "TYPE_INT64", "type_name": "x.Y", "json_name": "reportGoal"}',
])
def test_parse_json_accepts_camel_case_and_proto_names(body: str) -> None:
    with request_ctx(data=body, content_type="application/json; charset=utf-8"):
        assert web.parse_message(flask.request, Field) == make_field()


def test_parse_json_unknown_field_names_the_field_and_message() -> None:
    with request_ctx(data='{"nmae": "x"}', content_type="application/json"):
        with pytest.raises(errors.InvalidRequestError) as info:
            web.parse_message(flask.request, Field)
    assert "nmae" in str(info.value) and "FieldDescriptorProto" in str(info.value)
    assert errors.http_status_for(info.value) == 400


def test_parse_json_syntax_error() -> None:
    with request_ctx(data='{"name": ', content_type="application/json"):
        with pytest.raises(errors.InvalidRequestError, match="invalid JSON for google.protobuf.FieldDescriptorProto"):
            web.parse_message(flask.request, Field)


def test_parse_bad_binary_names_the_message_and_suggests_json() -> None:
    with request_ctx(data=b"\xff\xff\xff\xff", content_type="application/x-protobuf"):
        with pytest.raises(errors.InvalidRequestError) as info:
            web.parse_message(flask.request, Field)
    assert "not a valid binary google.protobuf.FieldDescriptorProto" in str(info.value)
    assert "application/json" in str(info.value)


def test_parse_without_content_type_infers_json_or_binary() -> None:
    with request_ctx(data=' {"name": "a"}', content_type=""):
        assert web.parse_message(flask.request, Field).name == "a"
    with request_ctx(data=Field(name="b").SerializeToString(), content_type=""):
        assert web.parse_message(flask.request, Field).name == "b"


def test_parse_empty_body_is_the_empty_message() -> None:
    with request_ctx(data=b"", content_type="application/json"):
        assert web.parse_message(flask.request, Field) == Field()


def test_parse_unsupported_content_type_is_415() -> None:
    with request_ctx(data="name: a", content_type="text/plain"):
        with pytest.raises(web.UnsupportedMediaTypeError, match="text/plain") as info:
            web.parse_message(flask.request, Field)
    assert errors.http_status_for(info.value) == 415


def test_parse_too_large_by_content_length() -> None:
    with request_ctx(data=b"x" * 101, content_type="application/x-protobuf"):
        with pytest.raises(errors.PayloadTooLargeError) as info:
            web.parse_message(flask.request, Field, max_bytes=100)
    assert "101 bytes" in str(info.value) and "at most 100 bytes" in str(info.value)
    assert errors.http_status_for(info.value) == 413


def test_parse_too_large_without_content_length() -> None:
    # A chunked body: no Content-Length, the server marks the stream as terminated.
    environ = {"wsgi.input": io.BytesIO(b"x" * 50), "wsgi.input_terminated": True, "CONTENT_TYPE": "application/x-protobuf"}
    with app.request_context({**app.test_request_context("/", method="POST").request.environ, **environ}):
        flask.request.environ.pop("CONTENT_LENGTH", None)
        with pytest.raises(errors.PayloadTooLargeError, match="larger than 20 bytes"):
            web.parse_message(flask.request, Field, max_bytes=20)


# --------------------------------------------------------------------------- responses


def test_message_response_follows_accept() -> None:
    msg = make_field()
    with request_ctx(headers={"Accept": "application/x-protobuf"}, data="{}", content_type="application/json"):
        response = web.message_response(msg, 201, flask.request)
        assert response.status_code == 201
        assert response.mimetype == "application/x-protobuf"
        assert Field.FromString(response.get_data()) == msg
    with request_ctx(headers={"Accept": "application/json"}, data=b"", content_type="application/x-protobuf"):
        response = web.message_response(msg, 200, flask.request)
        assert response.mimetype == "application/json"
        assert json.loads(response.get_data())["typeName"] == "x.Y"


def test_message_response_mirrors_request_type_without_accept() -> None:
    msg = make_field()
    with request_ctx(data=msg.SerializeToString(), content_type="application/x-protobuf"):
        response = web.message_response(msg, request=flask.request)
        assert response.mimetype == "application/x-protobuf"
    with request_ctx(headers={"Accept": "*/*"}, data="{}", content_type="application/json"):
        assert web.message_response(msg, request=flask.request).mimetype == "application/json"
    with app.app_context():
        assert web.message_response(msg).mimetype == "application/json"


@pytest.mark.parametrize(("accept", "content_type", "expected"), [
    ("text/html, image/gif, image/jpeg, */*; q=0.2", "application/json", "application/json"),  # Java's default
    ("text/html, image/gif, image/jpeg, */*; q=0.2", "application/x-protobuf", "application/x-protobuf"),
    ("application/json, */*", "application/x-protobuf", "application/json"),
    ("application/json;q=0.5, application/x-protobuf", "application/json", "application/x-protobuf"),
])
def test_message_response_only_explicit_accept_overrides_request_type(accept: str, content_type: str, expected: str) -> None:
    with request_ctx(headers={"Accept": accept}, data=b"", content_type=content_type):
        assert web.message_response(make_field(), request=flask.request).mimetype == expected


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (errors.InvalidRequestError("bad field", hint="fix it"), 400, "INVALID_ARGUMENT"),
        (errors.ConfigError("unknown field", location="line 3"), 400, "INVALID_ARGUMENT"),
        (errors.UnauthenticatedError("no key"), 401, "UNAUTHENTICATED"),
        (errors.PermissionDeniedError("nope"), 403, "PERMISSION_DENIED"),
        (errors.NotFoundError("no task 7"), 404, "NOT_FOUND"),
        (errors.ConflictError("active task exists"), 409, "ABORTED"),
        (errors.PreconditionFailedError("round moved on"), 412, "FAILED_PRECONDITION"),
        (errors.PayloadTooLargeError("too big"), 413, "PAYLOAD_TOO_LARGE"),
        (errors.TransientError("firestore down"), 503, "UNAVAILABLE"),
        (errors.ArtifactBuildError("unsupported ops"), 400, "INVALID_ARGUMENT"),
    ],
)
def test_error_response_maps_errors(error: Exception, code: int, status: str) -> None:
    with app.app_context():
        response = web.error_response(error)
    body = json.loads(response.get_data())
    assert response.status_code == code
    assert body == {"error": {"code": code, "status": status, "message": str(error)}}


def test_error_response_keeps_hint_and_location_in_message() -> None:
    with app.app_context():
        body = json.loads(web.error_response(errors.ConfigError("no such field", location="line 4", hint="use x")).get_data())
    assert body["error"]["message"] == "line 4: no such field (use x)"


def test_unknown_exception_is_500_without_leaking_its_text() -> None:
    with app.app_context():
        response = web.error_response(RuntimeError("secret internals"))
    body = json.loads(response.get_data())
    assert response.status_code == 500 and body["error"]["status"] == "INTERNAL"
    assert "secret" not in body["error"]["message"] and "RuntimeError" in body["error"]["message"]


# --------------------------------------------------------------------------- router


def make_router() -> web.Router:
    router = web.Router("task_assignment")

    @router.route("POST", r"/taskassignment/v1/population/(?P<population>[^/:]+):create-task-assignment")
    def create(request: flask.Request, population: str) -> flask.Response:
        return web.json_response({"population": population}, 201)

    @router.route("GET", r"/missing/(?P<item>\w+)")
    def missing(request: flask.Request, item: str) -> flask.Response:
        raise errors.NotFoundError(f"no {item}")

    @router.route("GET", r"/boom")
    def boom(request: flask.Request) -> flask.Response:
        raise ZeroDivisionError("x")

    return router


def dispatch(router: web.Router, method: str, path: str) -> flask.Response:
    with request_ctx(method=method, path=path):
        return app.make_response(router.dispatch(flask.request))


def test_router_passes_path_parameters() -> None:
    response = dispatch(make_router(), "POST", "/taskassignment/v1/population/mnist:create-task-assignment")
    assert response.status_code == 201 and json.loads(response.get_data()) == {"population": "mnist"}


def test_router_404_lists_known_routes() -> None:
    response = dispatch(make_router(), "GET", "/nowhere")
    error = json.loads(response.get_data())["error"]
    assert response.status_code == 404 and error["status"] == "NOT_FOUND"
    assert "GET /nowhere" in error["message"] and "task_assignment" in error["message"]
    assert "create-task-assignment" in error["message"]


def test_router_405_names_allowed_methods() -> None:
    response = dispatch(make_router(), "GET", "/taskassignment/v1/population/p:create-task-assignment")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert "allowed: POST" in json.loads(response.get_data())["error"]["message"]


def test_router_maps_handler_errors() -> None:
    router = make_router()
    assert dispatch(router, "GET", "/missing/task").status_code == 404
    assert json.loads(dispatch(router, "GET", "/missing/task").get_data())["error"]["message"] == "no task"
    assert dispatch(router, "GET", "/boom").status_code == 500


def test_router_requires_full_match() -> None:
    assert dispatch(make_router(), "GET", "/missing/task/extra").status_code == 404


# --------------------------------------------------------------------------- API key


def test_require_api_key() -> None:
    with request_ctx(headers={"x-api-key": "s3cret"}):
        web.require_api_key(flask.request, "s3cret")
        with pytest.raises(errors.UnauthenticatedError, match="invalid x-api-key"):
            web.require_api_key(flask.request, "other")
    with request_ctx(environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        with pytest.raises(errors.UnauthenticatedError, match="missing x-api-key header"):
            web.require_api_key(flask.request, "s3cret")
        web.require_api_key(flask.request, "")  # no key configured: open to this machine only


@pytest.mark.parametrize("remote", ["10.1.2.3", "192.168.0.7", "2001:db8::1", None])
def test_without_a_configured_key_only_loopback_callers_get_in(remote: str | None) -> None:
    environ = {"REMOTE_ADDR": remote} if remote else {}
    with request_ctx(environ_base=environ):
        with pytest.raises(errors.UnauthenticatedError, match="no API key configured, so it only answers callers"):
            web.require_api_key(flask.request, "")
    for loopback in ("127.0.0.1", "::1"):
        with request_ctx(environ_base={"REMOTE_ADDR": loopback}):
            web.require_api_key(flask.request, "")


# --------------------------------------------------------------------------- CloudEvents


def pubsub_event(data: bytes, attributes: dict[str, str] | None = None, message_id: str = "42") -> CloudEvent:
    message = {"data": base64.b64encode(data).decode(), "attributes": attributes or {}, "messageId": message_id}
    return CloudEvent(
        {"type": web.PUBSUB_MESSAGE_PUBLISHED, "source": "//pubsub.googleapis.com/projects/p/topics/t", "id": message_id},
        {"message": message, "subscription": "projects/p/subscriptions/s"},
    )


def test_decode_pubsub_event() -> None:
    data, attributes, message_id = web.decode_pubsub_event(pubsub_event(b"\x00payload", {"round": "3"}, "m-1"))
    assert (data, attributes, message_id) == (b"\x00payload", {"round": "3"}, "m-1")


def test_decode_pubsub_event_without_data_or_attributes() -> None:
    event = CloudEvent({"type": web.PUBSUB_MESSAGE_PUBLISHED, "source": "s", "id": "e-9"}, {"message": {}})
    assert web.decode_pubsub_event(event) == web.PubSubMessage(b"", {}, "e-9")


def test_decode_pubsub_event_rejects_other_events() -> None:
    event = CloudEvent({"type": "google.cloud.storage.object.v1.finalized", "source": "s"}, {"bucket": "b"})
    with pytest.raises(errors.InvalidRequestError, match="carries no Pub/Sub message"):
        web.decode_pubsub_event(event)
    bad = CloudEvent({"type": web.PUBSUB_MESSAGE_PUBLISHED, "source": "s"}, {"message": {"data": "not base64!"}})
    with pytest.raises(errors.InvalidRequestError, match="not base64"):
        web.decode_pubsub_event(bad)


def test_storage_object_from_pubsub_notification_and_eventarc() -> None:
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "fcp-gradient", "objectId": "p/1/2/d/a/gradient",
                  "objectGeneration": "17", "payloadFormat": "JSON_API_V1"}
    assert web.storage_object_from_event(pubsub_event(b"{}", attributes)) == ("fcp-gradient", "p/1/2/d/a/gradient", "17", 0)
    sized = web.storage_object_from_event(pubsub_event(b'{"size": "1234"}', attributes))
    assert sized.size == 1234
    deleted = dict(attributes, eventType="OBJECT_DELETE")
    assert web.storage_object_from_event(pubsub_event(b"{}", deleted)) is None
    direct = CloudEvent({"type": web.STORAGE_OBJECT_FINALIZED, "source": "//storage.googleapis.com/projects/_/buckets/b"},
                        {"bucket": "b", "name": "o", "generation": "5", "size": "42"})
    assert web.storage_object_from_event(direct) == web.StorageObject("b", "o", "5", 42)


def test_health_events() -> None:
    direct = CloudEvent({"type": web.HEALTH_EVENT_TYPE, "source": web.HEALTH_EVENT_SOURCE}, {})
    assert web.is_health_event(direct)
    assert web.is_health_event(pubsub_event(b"", {web.EVENT_TYPE_ATTRIBUTE: web.HEALTH_EVENT_TYPE}))
    assert not web.is_health_event(pubsub_event(b"", {"other": web.HEALTH_EVENT_TYPE}))
    headers = web.health_event_headers("id-1")
    assert headers["ce-type"] == web.HEALTH_EVENT_TYPE and headers["ce-id"] == "id-1" and headers["ce-specversion"] == "1.0"


def test_dispatch_event_error_convention() -> None:
    calls: list[str] = []

    def handler(event: CloudEvent) -> None:
        calls.append(event["id"])
        kind = web.decode_pubsub_event(event).attributes.get("fail")
        if kind == "transient":
            raise errors.TransientError("firestore unavailable")
        if kind == "permanent":
            raise errors.NotFoundError("no such round")
        if kind == "bug":
            raise KeyError("oops")

    web.dispatch_event("scheduler", pubsub_event(b"", {web.EVENT_TYPE_ATTRIBUTE: web.HEALTH_EVENT_TYPE}, "h"), handler)
    assert calls == []  # health probes never reach the handler
    web.dispatch_event("scheduler", pubsub_event(b"", {"fail": "permanent"}, "p"), handler)  # acknowledged
    with pytest.raises(errors.TransientError):
        web.dispatch_event("scheduler", pubsub_event(b"", {"fail": "transient"}, "t"), handler)
    with pytest.raises(KeyError):
        web.dispatch_event("scheduler", pubsub_event(b"", {"fail": "bug"}, "b"), handler)
    assert calls == ["p", "t", "b"]
