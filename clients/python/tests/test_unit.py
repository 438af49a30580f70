"""Pieces that need no server."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

import hale
from hale._transport import jwt_expiry


def test_merge_patch_follows_rfc_7396() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    patch = {"a": "z", "c": {"f": None}}
    assert hale.merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}}, "the target is not changed"
    assert hale.merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert hale.merge_patch({"a": 1}, {"b": {"c": None}}) == {"a": 1, "b": {}}


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    policy = hale.Reconnect(base=0.1, cap=1.0)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0)]:
        waits = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= wait <= ceiling for wait in waits), (attempt, max(waits))
        assert max(waits) > ceiling * 0.7 and min(waits) < ceiling * 0.3, "not spread over the whole range"
    assert hale.Reconnect(base=0.0).delay(5) == 0.0


def test_errors_map_codes_to_types() -> None:
    error = hale.HaleError.from_body({"code": "version_conflict", "message": "m", "retryable": False})
    assert isinstance(error, hale.VersionConflict) and error.code == hale.Code.VERSION_CONFLICT
    other = hale.HaleError.from_body({"code": "something_new", "message": "m"})
    assert type(other) is hale.ServerError and other.code == "something_new"
    fenced = hale.Fenced("fenced: incarnation 1: declared down")
    assert isinstance(fenced, hale.SessionClosed) and fenced.code == "fenced"
    assert str(fenced) == "fenced: incarnation 1: declared down"


def test_jwt_expiry_is_read_without_checking() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3MDAwMDAwMDB9.sig"
    assert jwt_expiry(token) == 1700000000
    assert jwt_expiry("not a token") is None


def test_task_and_welcome_records_read_frames() -> None:
    task = hale.Task.from_json(
        {
            "task": 7,
            "role": "coder",
            "attempts": 2,
            "payload": {"x": 1},
            "steps": [{"name": "plan", "result": 1, "attempt": 1, "at_ms": 5}, {"name": "pr", "state": "uncertain", "result": None, "attempt": 1, "at_ms": 6}],
        }
    )
    assert task.done("plan") and not task.done("pr") and task.step("pr") is not None
    welcome = hale.Welcome.from_json({"agent": "a", "incarnation": 3, "session": "a/3", "pending_replies": [{"message": 9, "seq": 2, "from": "b", "conversation": "c"}]})
    assert welcome.session == "a/3" and welcome.pending_replies[0].sender == "b"


def test_a_message_acked_before_its_redelivery_arrives_is_handed_over_once() -> None:
    from hale._session import Session
    from hale._transport import Credentials

    async def run() -> None:
        handed: List[Dict[str, Any]] = []
        session = Session(
            ["ws://unused"],
            "writer",
            dict,
            Credentials(None, None),
            None,
            None,
            lambda frame: None,
            handed.append,
        )

        def message(seq: int) -> Dict[str, Any]:
            return {"type": "message", "seq": seq}

        # Connection 1: 36 and 37 handed, the ack of 36 lost with the connection.
        session._deliver(message(36))
        session._deliver(message(37))
        # Connection 2 reads the mailbox before the resent ack of 36 is applied, and
        # the ack's answer overtakes the redelivered messages.
        session._acked_here.clear()
        session.acked(36)
        for seq in (36, 37, 38):
            session._deliver(message(seq))
        assert [frame["seq"] for frame in handed] == [36, 37, 38]
        assert not session._acked_here, "forgotten once delivery is past it"

    asyncio.run(run())


def test_addresses_are_split_on_commas_and_made_websocket_urls() -> None:
    from hale._transport import addresses, with_authority

    assert addresses("ws://a:1") == ["ws://a:1"]
    assert addresses(" http://a:1/ , https://b:2,, ws://c:3 ") == ["ws://a:1", "wss://b:2", "ws://c:3"]
    assert addresses(["ws://a:1", "b:2,wss://c:3", "ws://a:1"]) == ["ws://a:1", "ws://b:2", "wss://c:3"]
    assert addresses("") == [] and addresses([]) == []
    assert with_authority("wss://a:1", "b:2") == "wss://b:2"
    assert with_authority("ws://a:1/", "127.0.0.1:7702") == "ws://127.0.0.1:7702"


def test_not_leader_is_an_error_type_that_names_the_leader() -> None:
    body = {"code": "not_leader", "message": "m", "retryable": True, "leader": "127.0.0.1:7702"}
    error = hale.HaleError.from_body(body)
    assert isinstance(error, hale.NotLeader) and isinstance(error, hale.ServerError)
    assert error.code == hale.Code.NOT_LEADER and error.leader == "127.0.0.1:7702" and error.retryable
    assert hale.HaleError.from_body({"code": "not_leader", "message": "an election"}).leader is None
    assert hale.HaleError.from_body({"code": "version_conflict", "message": "m"}).leader is None


def test_connect_without_an_address_is_refused() -> None:
    async def run() -> None:
        try:
            await hale.Agent.connect(" , ", "a", "r")
        except hale.ConnectError as error:
            assert "no address" in error.message
        else:
            raise AssertionError("connected to nothing")

    asyncio.run(run())
