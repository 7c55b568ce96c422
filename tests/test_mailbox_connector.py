"""The mailbox connector: real messages in a local Maildir, each Message-ID once, across restarts."""
import email
import email.policy
from concurrent.futures import ThreadPoolExecutor

import pydantic
import pytest

from sinks.mailbox import MailboxConnector
from sinks.message import SEND

KEY = "5f0c2a9e41b7"
MESSAGE = {"to": "Jürgen Müller <sales@example.org>", "bcc": "audit@example.org", "subject": "New lead: Ada ✓", "text": "Ada wants a demo."}


def connector_in(base_dir, path="var/mail", **config):
    config = MailboxConnector.Config(kind="mailbox", path=path, sender="Sync Agent <sync@example.com>", **config)
    return MailboxConnector(config, session=None, clock=lambda: 1_700_000_000.0, base_dir=base_dir)


def messages(folder):
    """Every message file in a Maildir, parsed."""
    files = sorted(p for sub in ("new", "cur") for p in (folder / sub).iterdir())
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in files]


def test_a_message_is_written_readable_into_new(tmp_path):
    outcome = connector_in(tmp_path).run(SEND, MESSAGE, KEY)

    assert outcome.status == "succeeded"
    assert outcome.output["message_id"] == f"<{KEY}@example.com>"
    assert (tmp_path / "var/mail" / outcome.output["file"]).is_file()
    [message] = messages(tmp_path / "var/mail")
    assert message["Subject"] == "New lead: Ada ✓"
    assert message["To"].addresses[0].display_name == "Jürgen Müller"
    assert message["Message-ID"] == f"<{KEY}@example.com>"
    assert message["Envelope-To"] == "sales@example.org, audit@example.org" and message["Bcc"] is None
    assert message.get_content() == "Ada wants a demo.\n"


def test_the_same_key_is_skipped(tmp_path):
    connector = connector_in(tmp_path)

    first, second = connector.run(SEND, MESSAGE, KEY), connector.run(SEND, MESSAGE, KEY)

    assert first.status == second.status == "succeeded"
    assert second.output == {"message_id": f"<{KEY}@example.com>", "duplicate": True}
    assert len(messages(tmp_path / "var/mail")) == 1


def test_the_same_key_is_skipped_after_a_restart_even_once_read(tmp_path):
    connector_in(tmp_path).run(SEND, MESSAGE, KEY)
    folder = tmp_path / "var/mail"
    [written] = (folder / "new").iterdir()
    written.rename(folder / "cur" / f"{written.name}:2,S")  # a mail client marked it read

    outcome = connector_in(tmp_path).run(SEND, MESSAGE, KEY)

    assert outcome.output["duplicate"] is True
    assert len(messages(folder)) == 1


def test_different_keys_are_all_written(tmp_path):
    connector = connector_in(tmp_path)

    outcomes = [connector.run(SEND, MESSAGE, f"k{n}") for n in range(3)]

    assert [o.output.get("duplicate") for o in outcomes] == [None] * 3
    assert sorted(m["Message-ID"] for m in messages(tmp_path / "var/mail")) == ["<k0@example.com>", "<k1@example.com>", "<k2@example.com>"]


def test_concurrent_sends_of_one_key_write_it_once(tmp_path):
    connector = connector_in(tmp_path)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: connector.run(SEND, MESSAGE, KEY), range(16)))

    assert sum(not o.output.get("duplicate") for o in outcomes) == 1
    assert len(messages(tmp_path / "var/mail")) == 1


def test_an_absolute_path_ignores_base_dir(tmp_path):
    outcome = connector_in(tmp_path / "elsewhere", path=str(tmp_path / "box")).run(SEND, MESSAGE, KEY)

    assert outcome.status == "succeeded" and len(messages(tmp_path / "box")) == 1


def test_an_invalid_message_fails_and_writes_nothing(tmp_path):
    outcome = connector_in(tmp_path).run(SEND, {**MESSAGE, "subject": "=?UTF-8?Q?=0A?=Bcc: evil@example.net"}, KEY)

    assert outcome.status == "failed" and outcome.error.startswith("subject:")
    assert not (tmp_path / "var/mail").exists()


def test_an_unusable_folder_is_an_outcome_not_an_exception(tmp_path):
    (tmp_path / "file").write_text("not a folder")

    outcome = connector_in(tmp_path, path="file/mail").run(SEND, MESSAGE, KEY)

    assert outcome.status == "retryable" and str(tmp_path / "file") in outcome.error


def test_a_number_renders_as_text(tmp_path):
    outcome = connector_in(tmp_path).run(SEND, {**MESSAGE, "subject": 4711, "text": 3.5}, KEY)

    assert outcome.status == "succeeded"
    assert messages(tmp_path / "var/mail")[0]["Subject"] == "4711"


def test_config_rejects_unknown_keys_and_defaults_the_sender():
    assert MailboxConnector.Config(kind="mailbox", path="var/mail").sender == "sync-agent@localhost"
    with pytest.raises(pydantic.ValidationError):
        MailboxConnector.Config(kind="mailbox", path="var/mail", folder="x")


@pytest.mark.parametrize("field, value", [
    ("subject", "=?x-unknown?q?hi?="),
    ("to", "(" * 3000),
    ("reply_to", ["a" * 65 + "@example.org"]),
])
def test_a_value_email_cannot_carry_fails_naming_the_field_and_writes_nothing(tmp_path, field, value):
    outcome = connector_in(tmp_path).run(SEND, {**MESSAGE, field: value}, KEY)

    assert outcome.status == "failed" and outcome.error.startswith(f"{field}: ")
    assert not (tmp_path / "var/mail").exists() or messages(tmp_path / "var/mail") == []


def test_a_huge_subject_is_written_cut(tmp_path):
    outcome = connector_in(tmp_path).run(SEND, {**MESSAGE, "subject": "Grüße " * 100_000}, KEY)

    assert outcome.status == "succeeded"
    [message] = messages(tmp_path / "var/mail")
    assert message["Subject"] == ("Grüße " * 400)[:1999] + "…"
