"""The smtp connector against servers that misbehave: drips, endless replies, idle hang-ups, drops after the message.

``timeout`` bounds the whole dialogue of one message, a reply is capped in
lines and bytes, and a reused connection is reopened at once only when the
message cannot have been taken yet.
"""
import time

import pytest

from sinks.message import SEND
from sinks.smtp import SmtpConnector
from smtpserver import HostileSmtpServer, SmtpServer

SENDER = "Sync Agent <sync@example.com>"
MESSAGE = {"to": "sales@example.org", "subject": "New lead: Ada Lovelace", "text": "Ada wants a demo."}
TIMEOUT = 0.5


@pytest.fixture
def connect():
    """Make connectors (plain SMTP, a short timeout), closed after the test."""
    made = []

    def make(server, **config):
        settings = {"kind": "smtp", "host": server.host, "port": server.port, "security": "none", "sender": SENDER,
                    "timeout": TIMEOUT, **config}
        made.append(SmtpConnector(SmtpConnector.Config(**settings)))
        return made[-1]

    yield make
    for connector in made:
        connector.close()


def send(connector, key="k1"):
    return connector.run(SEND, MESSAGE, key)


def message_ids(payloads):
    """The Message-ID of each DATA payload, in order."""
    return [line.split(b":", 1)[1].strip().decode() for raw in payloads for line in raw.splitlines() if line.startswith(b"Message-ID:")]


# -- scripts for HostileSmtpServer: each plays one connection -------------------------------------------

def drip_greeting(talk, stop):
    talk.drip(stop, b"220-welcome\r\n")


def drip_ehlo(talk, stop):
    talk.send("220 hostile ESMTP")
    talk.until("EHLO")
    talk.drip(stop, b"250-still here\r\n")


def drip_bytes(talk, stop):
    talk.send("220 hostile ESMTP")
    talk.until("EHLO")
    talk.drip(stop, b"x")  # one line that never ends, a byte at a time


def drip_final_reply(talk, stop):
    talk.send("220 hostile ESMTP")
    talk.until(".")  # MAIL, RCPT, DATA answered; the message read
    talk.drip(stop, b"250-queued, maybe\r\n")


def endless_ehlo(talk, stop):
    talk.send("220 hostile ESMTP")
    talk.until("EHLO")
    talk.send(*["250-more"] * 5000, "250 ok")
    talk.until("QUIT")


def endless_bytes(talk, stop):
    talk.send("220 hostile ESMTP")
    talk.until("EHLO")
    talk.send(*["250-" + "x" * 8000] * 10, "250 ok")  # 80 KB, each line under smtplib's 8192
    talk.until("QUIT")


@pytest.mark.parametrize("script", [drip_greeting, drip_ehlo, drip_bytes, drip_final_reply])
def test_a_dripping_server_costs_about_the_timeout(connect, script):
    with HostileSmtpServer(script, lifetime=5) as server:
        start = time.monotonic()
        outcome = send(connect(server))
        elapsed = time.monotonic() - start

    assert (outcome.status, outcome.condition) == ("retryable", "timeout")
    assert elapsed < TIMEOUT + 1.0, f"{elapsed:.1f}s for a {TIMEOUT}s timeout"


@pytest.mark.parametrize("script", [endless_ehlo, endless_bytes])
def test_an_endless_reply_is_cut_and_retryable(connect, script):
    with HostileSmtpServer(script, lifetime=5) as server:
        outcome = send(connect(server, timeout="3s"))

    assert (outcome.status, outcome.condition) == ("retryable", "connection")
    assert "100 lines" in outcome.error


def test_the_deadline_is_per_message_not_per_connection(connect):
    with SmtpServer() as server:
        connector = connect(server, timeout="1s")
        server.stall_next(3, 0.6)  # each message takes more than half the timeout, all three well over it

        outcomes = [send(connector, key=f"k{n}") for n in range(3)]

    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert server.connections == 1


# -- an idle connection the server gave up (Postfix: "421 4.4.2 ... timeout exceeded") --------------

@pytest.mark.parametrize("at", ["MAIL", "RCPT"])
def test_a_421_on_a_reused_connection_reconnects_and_sends_at_once(connect, at):
    with SmtpServer() as server:
        connector = connect(server)
        assert send(connector, key="k1").status == "succeeded"
        server.reply_next(1, "421 4.4.2 smtp.test Error: timeout exceeded", at=at, close=True)

        outcome = send(connector, key="k2")

        assert (outcome.status, outcome.output["message_id"]) == ("succeeded", "<k2@example.com>")
        assert [m.message["Message-ID"] for m in server.messages] == ["<k1@example.com>", "<k2@example.com>"]
        assert server.connections == 2


def test_a_421_on_a_new_connection_goes_through_the_retry_policy(connect):
    with SmtpServer() as server:
        server.reply_next(1, "421 4.3.2 shutting down", at="MAIL", close=True)

        outcome = send(connect(server))

        assert (outcome.status, outcome.status_code, outcome.condition) == ("retryable", 421, "4xx")
        assert server.messages == [] and server.connections == 1


def test_a_421_after_the_message_on_a_reused_connection_is_not_resent_at_once(connect):
    with SmtpServer() as server:
        connector = connect(server)
        send(connector, key="k1")
        server.reply_next(1, "421 4.3.2 shutting down", at="DATA")

        outcome = send(connector, key="k2")

        assert (outcome.status, outcome.status_code, outcome.condition) == ("retryable", 421, "4xx")
        assert message_ids(server.data) == ["<k1@example.com>", "<k2@example.com>"]


# -- a connection dropped after the message: the server may hold it ---------------------------------

def test_a_drop_after_the_message_on_a_reused_connection_waits_for_the_retry_policy(connect):
    with SmtpServer() as server:
        connector = connect(server)
        send(connector, key="k1")
        server.drop_next(1, at="DATA")  # the final "." arrived; the connection closes without a reply

        outcome = send(connector, key="k2")

        assert (outcome.status, outcome.condition) == ("retryable", "connection")
        assert message_ids(server.data) == ["<k1@example.com>", "<k2@example.com>"]  # not sent again at once

        later = send(connector, key="k2")

        assert later.status == "succeeded"
        assert message_ids(server.data) == ["<k1@example.com>", "<k2@example.com>", "<k2@example.com>"]


def test_a_drop_before_the_message_on_a_reused_connection_is_resent_at_once(connect):
    with SmtpServer() as server:
        connector = connect(server)
        send(connector, key="k1")
        server.drop_next(1, at="RCPT")

        outcome = send(connector, key="k2")

        assert outcome.status == "succeeded"
        assert message_ids(server.data) == ["<k1@example.com>", "<k2@example.com>"]
        assert server.connections == 2


def unreadable_challenge(talk, stop):
    talk.send("220 hostile ESMTP")
    talk.command()  # EHLO
    talk.send("250-hostile", "250 AUTH CRAM-MD5")
    talk.command()  # AUTH CRAM-MD5
    talk.send("334 abc")  # not base64: smtplib raises binascii.Error, a ValueError
    talk.command()


def test_a_reply_smtplib_cannot_read_is_retryable_not_raised(connect):
    with HostileSmtpServer(unreadable_challenge, lifetime=5) as server:
        outcome = send(connect(server, username="agent", password="s3cret-pa55"))

    assert (outcome.status, outcome.condition) == ("retryable", "connection")
    assert "cannot read" in outcome.error and "s3cret-pa55" not in outcome.error
