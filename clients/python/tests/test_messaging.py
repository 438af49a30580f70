"""Durable messaging between Python agents: send, receive, reply, ack; each message handed
to the application once across a SIGKILL of hale; unacked messages, conversations and
pending replies given back on resume; the errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import List

import pytest

import hale
from support import ADMIN, Hale, eventually, free_address, run


async def connect(server: Hale, name: str, role: str = "r", **options: object) -> hale.Agent:
    return await hale.Agent.connect(server.ws_url, name, role, token=ADMIN, **options)  # type: ignore[arg-type]


@run
async def test_two_agents_send_reply_and_ack(server: Hale) -> None:
    planner = await connect(server, "planner", "planning")
    writer = await connect(server, "writer", "writing")
    assert writer.session_id == writer.welcome.session and writer.welcome.session

    sent = await planner.send({"write": "intro"}, to_agent="writer", conversation="c1", expects_reply=True)
    assert (sent.to, sent.conversation, sent.new) == ("writer", "c1", True)
    message = await writer.next_message(timeout=10)
    assert message is not None
    assert (message.sender, message.conversation, message.body, message.seq) == ("planner", "c1", {"write": "intro"}, sent.seq)
    assert message.expects_reply and message.message == sent.message and message.sent_at_ms

    answer = await writer.reply(message, {"done": "intro"})
    await writer.ack(message)
    assert answer.to == "planner" and answer.conversation == "c1"
    reply = await planner.next_message(timeout=10)
    assert reply is not None and reply.reply_to == sent.message and reply.body == {"done": "intro"}
    await planner.ack(reply.seq)
    await planner.ack(reply.seq)  # idempotent

    # To a role: hale picks an agent of it. Without a conversation hale starts one.
    by_role = await planner.send("any writer", to_role="writing")
    assert by_role.to == "writer" and by_role.conversation and by_role.conversation != "c1"
    got = await writer.next_message(timeout=10)
    assert got is not None and got.body == "any writer"
    await writer.ack(got)

    # The same idempotency key sends nothing new.
    first = await planner.send("once", to_agent="writer", key="k-1")
    again = await planner.send("once", to_agent="writer", key="k-1")
    assert (again.message, again.seq, again.new) == (first.message, first.seq, False)
    got = await writer.next_message(timeout=10)
    assert got is not None and got.seq == first.seq
    # Proof by order that nothing was duplicated: a message sent after the second send gets
    # the next mailbox entry, and is the next one handed over (a duplicate would come first).
    later = await planner.send("after the resend", to_agent="writer")
    assert later.seq == first.seq + 1, "the resend made a mailbox entry"
    got = await writer.next_message(timeout=10)
    assert got is not None and got.seq == later.seq, "a duplicate was delivered"

    with pytest.raises(hale.NoRecipient) as nobody:
        await planner.send("hello?", to_agent="nobody-here")
    assert nobody.value.code == "no_recipient"
    with pytest.raises(hale.UnknownMessage):
        await writer.ack(10_000)
    with pytest.raises(ValueError):
        await planner.send("x", to_agent="writer", to_role="writing")
    await planner.end_conversation("c1")
    await planner.close()
    await writer.close()


@run
async def test_a_full_mailbox_refuses_sends(tmp_path: Path) -> None:
    config = tmp_path / "hale.toml"
    config.write_text("[limits]\nmailbox_max = 3\n")
    server = Hale(tmp_path / "data", config=config)
    try:
        sender = await connect(server, "sender")
        await connect(server, "slow")
        for n in range(3):
            await sender.send(n, to_agent="slow")
        with pytest.raises(hale.MailboxFull) as full:
            await sender.send(3, to_agent="slow")
        assert full.value.code == "mailbox_full"
    finally:
        server.stop()


MESSAGES = 150


@run
async def test_each_message_is_handed_over_once_in_order_across_a_sigkill_of_hale(tmp_path: Path) -> None:
    listen = free_address()
    server = Hale(tmp_path / "data", listen)
    policy = hale.Reconnect(base=0.02, cap=0.3)
    planner = await connect(server, "planner", reconnect=policy)
    writer = await connect(server, "writer", reconnect=policy)
    session = writer.session_id
    received: List[int] = []
    seqs: List[int] = []

    async def read() -> None:
        while len(received) < MESSAGES:
            message = await writer.next_message(timeout=30)
            assert message is not None, "the session lasts"
            assert message.sender == "planner"
            received.append(int(message.body))
            seqs.append(message.seq)
            # Ack only every third message: the others are delivered again by every new
            # session, and the client must drop them.
            if message.seq % 3 == 0:
                await writer.ack(message)

    async def send() -> List[int]:
        seqs = []
        for n in range(MESSAGES):
            seqs.append((await planner.send(n, to_agent="writer", conversation="stream")).seq)
            await asyncio.sleep(0.005)  # spread the stream over the kill
        return seqs

    reading = asyncio.ensure_future(read())
    sending = asyncio.ensure_future(send())
    # The kill lands in the middle of the stream.
    await eventually("the stream under way", 30, lambda: len(received) >= MESSAGES // 10, lambda: len(received))
    server.kill()
    # The outage: the clients' first retries fail and back off.
    await asyncio.sleep(0.3)
    server = Hale(tmp_path / "data", listen)
    try:
        sent = await asyncio.wait_for(sending, 30)
        await asyncio.wait_for(reading, 30)
        await eventually("both agents reconnected", 10, lambda: writer.reconnects >= 1 and planner.reconnects >= 1)
        assert writer.session_id == session, "the run kept its session across the restart"
        assert received == list(range(MESSAGES)), "each message once, in order"
        assert seqs == sent == list(range(1, MESSAGES + 1)), "one mailbox entry per message: resent sends were not doubled"
        mailbox = server.ok("GET", "/v1/agents/writer/mailbox")
        assert mailbox["unacked"] == MESSAGES - MESSAGES // 3
    finally:
        await planner.close()
        await writer.close()
        server.stop()


@run
async def test_a_resumed_run_gets_its_unacked_messages_conversations_and_pending_replies(server: Hale) -> None:
    planner = await connect(server, "planner")
    writer = await connect(server, "writer")
    question = await planner.send({"q": "ready?"}, to_agent="writer", conversation="plan-7", expects_reply=True)
    note = await planner.send({"fyi": 1}, to_agent="writer", conversation="plan-7")
    first = await writer.next_message(timeout=10)
    second = await writer.next_message(timeout=10)
    assert first is not None and second is not None and (first.seq, second.seq) == (question.seq, note.seq)
    await writer.ack(second)
    await writer.close()

    # The run resumes: the unacked question comes again; the conversation and the reply it
    # owes are in the welcome.
    writer = await connect(server, "writer", incarnation=1)
    assert writer.welcome.resumed and writer.welcome.unacked == 1
    assert [c.id for c in writer.conversations] == ["plan-7"]
    assert sorted(writer.conversations[0].participants) == ["planner", "writer"]
    pending = writer.pending_replies
    assert [(p.message, p.seq, p.sender, p.conversation) for p in pending] == [
        (question.message, question.seq, "planner", "plan-7")
    ]
    again = await writer.next_message(timeout=10)
    assert again is not None and again.seq == question.seq and again.body == {"q": "ready?"}
    # Proof by order that the acked note stays acked: the mailbox hands messages over in
    # order, so the note (older) would come before a message sent now.
    later = await planner.send({"fyi": 2}, to_agent="writer", conversation="plan-7")
    after = await writer.next_message(timeout=10)
    assert after is not None and after.seq == later.seq, "the acked note came back"
    await writer.ack(after)
    await writer.reply(again, {"a": "yes"})
    await writer.ack(again)
    await writer.close()

    writer = await connect(server, "writer", incarnation=1)
    assert writer.pending_replies == [] and writer.welcome.unacked == 0
    answer = await planner.next_message(timeout=10)
    assert answer is not None and answer.reply_to == question.message and answer.body == {"a": "yes"}
    await planner.close()
    await writer.close()
