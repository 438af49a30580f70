"""Tokens: an agent's own token, another agent's name, refresh ahead of expiry and on
token_expired, a copied refresh token revoking everything."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any, Dict

import pytest

import hale
from support import Hale, eventually, run


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> Dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def reissue(server: Hale, token: str, **claims: Any) -> str:
    """``token`` with some claims changed, signed again with the server's own key."""
    key = (server.data / "signing.key").read_text().strip().encode()
    header, payload, _ = token.split(".")
    body: Dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(claims)
    signed = f"{header}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64(signature)}"


@run
async def test_an_agent_token_acts_for_its_own_agent_only(server: Hale) -> None:
    bob = server.issue_tokens("bob")
    agent = await hale.Agent.connect(server.ws_url, "bob", "r", token=bob["access_token"])
    assert await agent.checkpoint({"mine": True}) == 1
    await agent.close()
    with pytest.raises(hale.AuthError) as refused:
        await hale.Agent.connect(server.ws_url, "alice", "r", token=bob["access_token"])
    assert refused.value.code == "forbidden"
    with pytest.raises(hale.AuthError) as anonymous:
        await hale.Agent.connect(server.ws_url, "bob", "r")
    assert anonymous.value.code == "unauthenticated"
    with pytest.raises(hale.ConnectError):
        await hale.Agent.connect("ws://127.0.0.1:9", "bob", "r", token=bob["access_token"])


@run
async def test_tokens_are_refreshed_ahead_of_expiry_and_when_hale_says_expired(server: Hale) -> None:
    pair = server.issue_tokens("carol")
    now = int(time.time())
    expired = reissue(server, pair["access_token"], iat=now - 1200, nbf=now - 1200, exp=now - 300)
    # Ahead of expiry: the client sees the token is due and refreshes before connecting.
    agent = await hale.Agent.connect(server.ws_url, "carol", "r", token=expired, refresh_token=pair["refresh_token"])
    assert agent.token_refreshes == 1 and agent.token != expired
    await agent.checkpoint({"a": 1})
    await agent.close()

    # On token_expired: a client that did not think the token due (a skewed clock, here a
    # negative margin) is told so by hale, refreshes and connects.
    current = server.issue_tokens("carol")
    expired = reissue(server, current["access_token"], iat=now - 1200, nbf=now - 1200, exp=now - 300)
    agent = await hale.Agent.connect(
        server.ws_url, "carol", "r", token=expired, refresh_token=current["refresh_token"], refresh_ahead=-3600
    )
    assert agent.token_refreshes == 1
    assert await agent.checkpoint({"b": 2}) == 2

    # The refresh token was rotated: presenting the old one again looks like a copy, and
    # hale revokes every token of the agent, which ends its session.
    status, answer = server.http("POST", "/v1/auth/refresh", {"agent": "carol", "refresh_token": current["refresh_token"]}, token=None)
    assert status == 401 and answer["error"]["code"] == "token_revoked", answer
    reason = await asyncio.wait_for(agent.ended(), 10)
    assert "ended by hale" in reason, reason


@run
async def test_a_session_outlives_its_first_token_by_renewing_it_in_band(tmp_path: Any) -> None:
    config = tmp_path / "hale.toml"
    config.write_text("[server]\naccess_token_ttl_s = 2\n")
    server = Hale(tmp_path / "data", config=config)
    try:
        pair = server.issue_tokens("erin")
        # No reconnects: if hale closed the session when the first token ran out (2 s and
        # a 5 s leeway), the session would be over.
        agent = await hale.Agent.connect(
            server.ws_url, "erin", "r", token=pair["access_token"], refresh_token=pair["refresh_token"]
        )
        first_expiry = hale._transport.jwt_expiry(pair["access_token"])
        assert first_expiry is not None
        # Proof by order, not by sleeping past the expiry: a witness session that never
        # renews, on a token issued in a later second (so it expires later than erin's
        # first), is closed by hale once its token and the leeway are over. By then erin's
        # session, had it not renewed, would have been closed first.
        issued = claims_of(pair["access_token"])["iat"]
        await eventually("a second after erin's token was issued", 5, lambda: time.time() >= issued + 1)
        witness = server.issue_tokens("frank")
        assert claims_of(witness["access_token"])["exp"] > first_expiry
        frank = await hale.Agent.connect(server.ws_url, "frank", "r", token=witness["access_token"])
        reason = await asyncio.wait_for(frank.ended(), 30)
        assert "expired" in reason, reason
        assert time.time() >= first_expiry + 5
        assert agent.token_refreshes >= 2 and agent.token != pair["access_token"]
        assert await agent.checkpoint({"alive": True}) == 1
        assert not agent.closed and agent.reconnects == 0
        await agent.close()
    finally:
        server.stop()
