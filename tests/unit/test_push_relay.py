"""The push relay's route syntax and push body (its delivery is tested on the emulator)."""
from __future__ import annotations

import pytest

from fedcompute.catalogue import FUNCTIONS
from fedcompute.stack.local import EMULATOR_PUSH_LOOPS, relayed
from fedcompute.stack.push_relay import Route, push_body


def test_a_route_names_subscription_endpoint_and_concurrency() -> None:
    route = Route.parse("projects/p/subscriptions/gcs-to-ingest=http://127.0.0.1:8080/projects/p/topics/t:8")
    assert route == Route("projects/p/subscriptions/gcs-to-ingest", "http://127.0.0.1:8080/projects/p/topics/t", 8)


@pytest.mark.parametrize("text", ["gcs-to-ingest=http://h:1/x:8", "projects/p/subscriptions/s=http://h:1/x",
                                  "projects/p/subscriptions/s=http://h:1/x:0", "projects/p/subscriptions/s"])
def test_a_malformed_route_is_refused_with_its_expected_shape(text: str) -> None:
    with pytest.raises(ValueError, match="projects/P/subscriptions/S=http"):
        Route.parse(text)


def test_the_push_body_carries_both_spellings_of_id_and_time_and_the_attempt() -> None:
    received = {"ackId": "a", "deliveryAttempt": 3,
                "message": {"data": "eA==", "attributes": {"k": "v"}, "messageId": "42", "publishTime": "T"}}
    body = push_body(received, "projects/p/subscriptions/s")
    assert body == {"subscription": "projects/p/subscriptions/s", "deliveryAttempt": 3,
                    "message": {"data": "eA==", "attributes": {"k": "v"}, "messageId": "42", "message_id": "42",
                                "publishTime": "T", "publish_time": "T"}}
    assert "deliveryAttempt" not in push_body({**received, "deliveryAttempt": 0}, "s")


def test_only_functions_serving_more_than_the_emulators_push_loops_are_relayed() -> None:
    assert {name for name, spec in FUNCTIONS.items() if relayed(spec)} == {"result_ingestion"}
    assert all(spec.concurrency <= EMULATOR_PUSH_LOOPS for spec in FUNCTIONS.values()
               if spec.topic_field and not relayed(spec))
