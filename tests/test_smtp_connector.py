"""The smtp connector against a live SMTP server on 127.0.0.1 (tests/smtpserver.py)."""
import email.utils
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pydantic
import pytest

from sinks.base import Action, ActionError, SinkError
from sinks.message import SEND
from sinks.smtp import SmtpConnector
from smtpserver import SmtpServer, free_port, make_certificate

KEY = "5f0c2a9e41b7"
NOW = 1_700_000_000.0
SENDER = "Sync Agent <sync@example.com>"
MESSAGE = {"to": "sales@example.org", "subject": "New lead: Ada Lovelace", "text": "Ada wants a demo."}
PASSWORD = "hunter2-not-in-logs"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server():
    with SmtpServer() as server:
        yield server


@pytest.fixture
def connect():
    """Make connectors to a server (plain SMTP unless told), closed after the test."""
    made = []

    def make(server, **config):
        settings = {"kind": "smtp", "host": server.host, "port": server.port, "security": "none", "sender": SENDER, "timeout": "2s", **config}
        made.append(SmtpConnector(SmtpConnector.Config(**settings), session=None, clock=lambda: NOW))
        return made[-1]

    yield make
    for connector in made:
        connector.close()


def send(connector, key=KEY, **fields):
    return connector.run(SEND, {**MESSAGE, **fields}, key)


def test_plain_send_delivers_the_message(server, connect):
    outcome = send(connect(server))

    assert (outcome.status, outcome.status_code) == ("succeeded", 250)
    assert outcome.output == {"message_id": f"<{KEY}@example.com>", "refused": {}}
    [received] = server.messages
    assert (received.mail_from, received.rcpt_tos) == ("sync@example.com", ["sales@example.org"])
    message = received.message
    assert message["From"] == SENDER and message["To"] == "sales@example.org"
    assert message["Subject"] == "New lead: Ada Lovelace"
    assert message["Message-ID"] == f"<{KEY}@example.com>"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message.get_content() == "Ada wants a demo.\n"


def test_text_and_html_make_an_alternative(server, connect):
    assert send(connect(server), html="<p>Ada &lt;3</p>").status == "succeeded"

    message = server.messages[0].message
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("html",)).get_content() == "<p>Ada &lt;3</p>\n"
    assert message.get_body(("plain",)).get_content() == "Ada wants a demo.\n"


def test_auth_logs_in_once_per_connection(connect):
    with SmtpServer(auth=("agent", PASSWORD)) as server:
        connector = connect(server, username="agent", password=PASSWORD)
        outcomes = [send(connector, key=f"k{n}") for n in range(3)]

        assert [o.status for o in outcomes] == ["succeeded"] * 3
        assert server.logins == ["agent"] and server.connections == 1


def test_wrong_password_pauses_the_connector(connect):
    with SmtpServer(auth=("agent", PASSWORD)) as server:
        outcome = send(connect(server, username="agent", password="wrong"))

        assert (outcome.status, outcome.status_code, outcome.condition) == ("paused", 535, "auth")
        assert "535" in outcome.error and not server.messages


def test_missing_credentials_pause_the_connector(connect):
    with SmtpServer(auth=("agent", PASSWORD)) as server:
        outcome = send(connect(server))

        assert (outcome.status, outcome.status_code, outcome.condition) == ("paused", 530, "auth")
        assert not server.messages


def test_starttls_with_a_private_ca_and_auth(certificate, connect):
    with SmtpServer(auth=("agent", PASSWORD), certificate=certificate) as server:
        connector = connect(server, security="starttls", ca_file=str(certificate[0]), username="agent", password=PASSWORD)

        assert send(connector).status == "succeeded"
        assert server.logins == ["agent"] and len(server.messages) == 1


def test_a_relative_ca_file_is_taken_from_the_config_folder(certificate, tmp_path):
    config = SmtpConnector.Config(kind="smtp", host="127.0.0.1", sender=SENDER, ca_file=certificate[0].name)
    SmtpConnector(config, base_dir=certificate[0].parent).close()
    with pytest.raises(SinkError, match="ca_file"):
        SmtpConnector(config, base_dir=tmp_path)


def test_implicit_tls_with_a_private_ca(certificate, connect):
    with SmtpServer(certificate=certificate, implicit_tls=True) as server:
        assert send(connect(server, security="ssl", ca_file=str(certificate[0]))).status == "succeeded"
        assert len(server.messages) == 1


@pytest.mark.parametrize("security, implicit_tls", [("starttls", False), ("ssl", True)])
def test_untrusted_certificate_pauses(certificate, connect, security, implicit_tls):
    with SmtpServer(certificate=certificate, implicit_tls=implicit_tls) as server:
        outcome = send(connect(server, security=security))

        assert (outcome.status, outcome.condition) == ("paused", "tls")
        assert "ca_file" in outcome.error and not server.messages


def test_a_server_without_starttls_pauses_instead_of_sending_in_clear(server, connect):
    outcome = send(connect(server, security="starttls"))

    assert (outcome.status, outcome.condition) == ("paused", "config")
    assert "STARTTLS" in outcome.error and not server.messages


@pytest.mark.parametrize("reply, at", [("421 4.3.2 shutting down", "DATA"), ("451 4.3.0 try later", "DATA"), ("450 4.2.0 busy", "MAIL"), ("452 4.3.1 full", "RCPT")])
def test_a_transient_reply_is_retryable_then_delivered_once(server, connect, reply, at):
    connector = connect(server)
    server.reply_next(1, reply, at=at)

    first, second = send(connector), send(connector)

    assert (first.status, first.status_code, first.condition) == ("retryable", int(reply[:3]), "4xx")
    assert reply[4:] in first.error
    assert second.status == "succeeded" and len(server.messages) == 1


@pytest.mark.parametrize("reply, at", [("550 5.1.1 no such user", "RCPT"), ("553 5.1.8 sender rejected", "MAIL"), ("554 5.7.1 message refused", "DATA")])
def test_a_permanent_reply_fails_with_the_reply_text(server, connect, reply, at):
    server.reply_next(1, reply, at=at)

    outcome = send(connect(server))

    assert (outcome.status, outcome.status_code) == ("failed", int(reply[:3]))
    assert reply in outcome.error and not server.messages


def test_some_recipients_refused_is_a_success_that_lists_them(server, connect):
    server.reply_next(1, "550 5.1.1 no such user", at="RCPT")

    outcome = send(connect(server), to="gone@example.org, sales@example.org")

    assert outcome.status == "succeeded"
    assert outcome.output["refused"] == {"gone@example.org": "550 5.1.1 no such user"}
    assert server.messages[0].rcpt_tos == ["sales@example.org"]


def test_all_recipients_refused_takes_the_most_hopeful_reply(server, connect):
    server.reply_next(1, "550 5.1.1 no such user", at="RCPT")
    server.reply_next(1, "451 4.3.0 try later", at="RCPT")

    outcome = send(connect(server), to="gone@example.org, sales@example.org")

    assert (outcome.status, outcome.status_code) == ("retryable", 451)
    assert "gone@example.org: 550" in outcome.error and "sales@example.org: 451" in outcome.error


def test_the_connection_is_reused_across_sends(server, connect):
    connector = connect(server)

    outcomes = [send(connector, key=f"k{n}") for n in range(5)]

    assert {o.status for o in outcomes} == {"succeeded"}
    assert server.connections == 1 and len(server.messages) == 5


def test_a_dropped_connection_is_reopened(server, connect):
    connector = connect(server)
    send(connector, key="k1")
    server.drop_next(1)

    outcome = send(connector, key="k2")

    assert outcome.status == "succeeded"
    assert server.connections == 2 and len(server.messages) == 2


def test_a_connection_dropped_again_after_reopening_is_retryable(server, connect):
    connector = connect(server)
    send(connector, key="k1")
    server.drop_next(2)

    outcome = send(connector, key="k2")

    assert (outcome.status, outcome.condition) == ("retryable", "connection")
    assert send(connector, key="k2").status == "succeeded"
    assert len(server.messages) == 2


def test_a_server_that_is_down_is_retryable(connect):
    class Nowhere:
        host, port = "127.0.0.1", free_port()

    outcome = send(connect(Nowhere))

    assert (outcome.status, outcome.condition) == ("retryable", "connection")
    assert outcome.unreachable  # nothing reached it: the agent holds the connector instead of spending attempts


def test_a_timeout_is_retryable_and_the_retry_keeps_the_message_id(server, connect):
    connector = connect(server, timeout="100ms")
    server.stall_next(1, 0.3)  # the server accepts the message after the client gave up

    first = send(connector)
    deadline = time.monotonic() + 2
    while not server.messages and time.monotonic() < deadline:
        time.sleep(0.01)
    second = send(connector)

    assert (first.status, first.condition) == ("retryable", "timeout")
    assert second.status == "succeeded"
    assert [m.message["Message-ID"] for m in server.messages] == [f"<{KEY}@example.com>"] * 2


def test_a_timeout_while_connecting_is_retryable():
    def timing_out(config, context, timeout):
        raise TimeoutError("timed out")

    config = SmtpConnector.Config(kind="smtp", host="smtp.example.invalid", sender=SENDER)
    outcome = SmtpConnector(config, session=None, clock=lambda: NOW, smtp_factory=timing_out).run(SEND, MESSAGE, KEY)

    assert (outcome.status, outcome.condition) == ("retryable", "timeout")


INJECTIONS = [
    ("subject", "Hello\r\nBcc: evil@example.net"),
    ("subject", "Hello\nBcc: evil@example.net"),
    ("subject", "=?UTF-8?Q?=0A?=Bcc: evil@example.net"),
    ("subject", "Hello =?UTF-8?B?DQpCY2M6IGV2aWxAZXhhbXBsZS5uZXQ=?="),
    ("to", "sales@example.org\r\nBcc: evil@example.net"),
    ("to", "=?UTF-8?Q?=0A?=Bcc: evil@example.net"),
    ("to", ["sales@example.org\r\nBcc: evil@example.net"]),
    ("reply_to", "reply@example.org\r\nBcc: evil@example.net"),
    ("reply_to", "=?UTF-8?Q?Ada=0D=0A?= <reply@example.org>"),
    ("cc", "boss@example.org\x00"),
]


@pytest.mark.parametrize("field, value", INJECTIONS)
def test_header_injection_fails_and_sends_nothing(server, connect, field, value):
    outcome = send(connect(server), **{field: value})

    assert outcome.status == "failed"
    assert outcome.error.startswith(f"{field}:") and "control character" in outcome.error
    assert not server.messages and server.connections == 0


@pytest.mark.parametrize("field, value", [
    ("subject", "=?x-unknown?q?hi?="),                   # an encoded word in a charset Python does not know
    ("to", "=?x-unknown?q?hi?= <a@example.org>"),
    ("reply_to", ["=?x-unknown?q?hi?= <a@example.org>"]),
    ("to", "(" * 3000),                                   # RecursionError in the address parser
    ("cc", ["(" * 3000 + "a@example.org"]),
    ("to", "a" * 65 + "@example.org"),                    # over RFC 5321's 64-octet local part
])
def test_a_value_email_cannot_carry_fails_the_record_naming_the_field(server, connect, field, value):
    outcome = send(connect(server), **{field: value})

    assert (outcome.status, outcome.condition) == ("failed", None)
    assert outcome.error.startswith(f"{field}: ") and len(outcome.error) < 300
    assert not server.messages and server.connections == 0


def test_a_huge_subject_is_sent_cut_with_an_ellipsis(server, connect):
    outcome = send(connect(server), subject="Grüße " * 100_000)

    assert outcome.status == "succeeded"
    subject = server.messages[0].message["Subject"]
    assert subject == ("Grüße " * 400)[:1999] + "…"


@pytest.mark.parametrize("field, value", [("to", "not-an-address"), ("cc", "ada@"), ("to", "alice@example.org)<bob@example.org>"), ("to", ["a@example.org, b@example.org"]), ("to", "")])
def test_an_invalid_address_fails_naming_it(server, connect, field, value):
    outcome = send(connect(server), **{field: value})

    assert outcome.status == "failed" and outcome.error.startswith(f"{field}:")
    assert repr(value if isinstance(value, str) else value[0]) in outcome.error
    assert not server.messages


def test_bcc_is_in_the_envelope_and_not_in_the_headers(server, connect):
    outcome = send(connect(server), to=["sales@example.org"], cc="boss@example.org", bcc="Audit <audit@example.org>, sales@example.org")

    assert outcome.status == "succeeded"
    [received] = server.messages
    assert received.rcpt_tos == ["sales@example.org", "boss@example.org", "audit@example.org"]
    assert received.message["Bcc"] is None and b"audit@" not in received.raw
    assert received.message["Cc"] == "boss@example.org"


def test_non_ascii_subject_and_names_are_encoded_and_readable(server, connect):
    subject = "Neuer Lead: Jürgen Müller – Grüße ✓ " + "lang " * 20
    outcome = send(connect(server), subject=subject, to="Jürgen Müller <j@example.org>", reply_to='"Doe, Jane" <jane@example.org>', text="Grüße")

    assert outcome.status == "succeeded"
    received = server.messages[0]
    assert received.raw.isascii()
    assert received.message["Subject"] == subject
    assert received.message["To"].addresses[0].display_name == "Jürgen Müller"
    assert received.message["Reply-To"].addresses[0].display_name == "Doe, Jane"
    assert received.message.get_content().splitlines() == ["Grüße"]  # base64 keeps the canonical CRLF


def test_the_same_key_resends_the_same_message_id(server, connect):
    connector = connect(server)

    outcomes = [send(connector), send(connector), send(connector, key="other")]

    assert [o.output["message_id"] for o in outcomes] == [f"<{KEY}@example.com>"] * 2 + ["<other@example.com>"]
    assert [m.message["Message-ID"] for m in server.messages] == [o.output["message_id"] for o in outcomes]


def test_the_password_never_reaches_an_outcome_or_a_log(caplog, capfd, connect):
    caplog.set_level(logging.DEBUG)
    with SmtpServer(auth=("agent", PASSWORD)) as server:
        refused = connect(server, username="agent", password=PASSWORD + "x")
        accepted = connect(server, username="agent", password=PASSWORD)
        outcomes = [send(refused), send(accepted)]

    assert [o.status for o in outcomes] == ["paused", "succeeded"]
    captured = capfd.readouterr()
    for text in (repr(outcomes), caplog.text, captured.out, captured.err, repr(accepted.config), accepted.config.model_dump_json()):
        assert PASSWORD not in text


def test_concurrent_sends_share_one_connection(server, connect):
    connector = connect(server)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda n: send(connector, key=f"k{n}"), range(40)))

    assert {o.status for o in outcomes} == {"succeeded"}
    assert len(server.messages) == 40 and server.connections == 1
    assert sorted(m.message["Message-ID"] for m in server.messages) == sorted(f"<k{n}@example.com>" for n in range(40))


def test_an_unknown_action_is_a_programming_error(server, connect):
    with pytest.raises(ActionError):
        connect(server).run(Action("message", "delete"), MESSAGE, KEY)


def test_close_says_quit_and_a_later_send_reconnects(server, connect):
    connector = connect(server)
    send(connector, key="k1")
    connector.close()

    assert send(connector, key="k2").status == "succeeded"
    assert server.connections == 2


def test_config_defaults_and_errors():
    config = SmtpConnector.Config(kind="smtp", host="smtp.example.invalid", sender=SENDER, timeout="1m")
    assert (config.port, config.security, config.timeout) == (587, "starttls", 60.0)
    assert SmtpConnector.Config(kind="smtp", host="h", sender=SENDER, security="ssl").port == 465
    schema = config.actions()[SEND].model_json_schema()
    assert schema["properties"]["html"]["autoescape"] is True
    assert set(schema["required"]) == {"to", "subject"}
    for bad in ({"hots": "x"}, {"username": "agent"}, {"sender": "not an address"}, {"security": "tls"}, {"port": 0}):
        with pytest.raises(pydantic.ValidationError):
            SmtpConnector.Config(**{"kind": "smtp", "host": "smtp.example.invalid", "sender": SENDER, **bad})


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), OSError(113, "No route to host"),
                                   OSError(101, "Network is unreachable")])
def test_a_connect_that_reaches_no_server_marks_the_connector_unreachable(error):
    from sinks.smtp import SmtpConnector

    def factory(config, context, timeout):
        raise error

    config = SmtpConnector.Config.model_validate({"kind": "smtp", "host": "mail.example.invalid", "port": 25, "security": "none",
                                                  "sender": "agent@example.invalid"})
    outcome = SmtpConnector(config, smtp_factory=factory).run(SEND, {"to": ["a@example.invalid"], "subject": "s", "text": "t"}, "k1")
    assert (outcome.status, outcome.unreachable) == ("retryable", True)
