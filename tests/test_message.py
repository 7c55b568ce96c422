"""compose(): hostile record values are cut or refused by field, never raised and never slow."""
import email
import email.policy

import pytest

from sinks.message import MAX_ADDRESSES, MAX_NAME, MAX_NAMES, MAX_SUBJECT, InvalidMessage, compose

SENDER = "Sync Agent <sync@example.com>"
MESSAGE = {"to": "sales@example.org", "subject": "New lead", "text": "Ada wants a demo."}


def build(**fields):
    mail = compose({**MESSAGE, **fields}, sender=SENDER, key="k1", now=1_700_000_000.0)
    return email.message_from_bytes(mail.raw, policy=email.policy.default)


def refusal(**fields) -> str:
    with pytest.raises(InvalidMessage) as caught:
        compose({**MESSAGE, **fields}, sender=SENDER, key="k1", now=1_700_000_000.0)
    return str(caught.value)


@pytest.mark.parametrize("subject", ["ü " * 300_000, "x" * 600_000])
def test_a_huge_subject_is_cut_with_an_ellipsis(subject):
    message = build(subject=subject)

    assert message["Subject"] == subject[:MAX_SUBJECT - 1] + "…"
    assert len(message["Subject"]) == MAX_SUBJECT == 2000


def test_a_subject_at_the_limit_is_kept_whole():
    assert build(subject="s" * MAX_SUBJECT)["Subject"] == "s" * MAX_SUBJECT


@pytest.mark.parametrize("field", ["to", "cc", "reply_to"])
def test_a_huge_display_name_is_cut_with_an_ellipsis(field):
    name = "Ada Lovelace " * 50_000
    message = build(**{field: [f'"{name}" <ada@example.org>']})

    header = {"to": "To", "cc": "Cc", "reply_to": "Reply-To"}[field]
    [address] = message[header].addresses
    assert address.display_name == name[:MAX_NAME - 1] + "…" and address.addr_spec == "ada@example.org"


def test_a_huge_non_ascii_display_name_is_cut_too():
    mail = compose({**MESSAGE, "to": [f"{'Jürgen ' * 100_000}<j@example.org>"]}, sender=SENDER, key="k1", now=0.0)

    assert len(mail.raw) < 10 * MAX_NAME  # encoded, a 2,000-character name takes some 6 KB, not 2 MB
    assert mail.recipients == ["j@example.org"]


@pytest.mark.parametrize("field, address", [
    ("to", "a" * 65 + "@example.org"),                                        # local part over 64
    ("cc", "ada@" + ".".join(["d" * 63] * 4) + ".org"),                      # domain over 255
    ("reply_to", "a" * 64 + "@" + ".".join(["d" * 60] * 3) + ".example.org"),  # whole address over 254
    ("bcc", "a" * 600_000 + "@example.org"),
])
def test_an_address_over_the_rfc_5321_limits_is_refused(field, address):
    error = refusal(**{field: [address]})

    assert error.startswith(f"{field}: ") and "RFC 5321" in error
    assert len(error) < 300  # the value is shown cut, not whole


def test_an_address_at_the_limits_is_accepted():
    address = "a" * 64 + "@" + ".".join(["d" * 61] * 3) + ".org"  # 64 + 1 + 189 = 254 octets
    assert len(address) == 254
    assert build(to=[address])["To"].addresses[0].addr_spec == address


@pytest.mark.parametrize("value", [[f"u{n}@example.org" for n in range(MAX_ADDRESSES + 1)],
                                   ", ".join(f"u{n}@example.org" for n in range(MAX_ADDRESSES + 1))])
def test_too_many_addresses_in_a_field_are_refused(value):
    error = refusal(to=value)

    assert error.startswith("to: ") and str(MAX_ADDRESSES) in error


def test_too_many_characters_of_display_names_in_a_field_are_refused():
    names = [f"{'中文' * 1000} <u{n}@example.org>" for n in range(MAX_NAMES // MAX_NAME + 1)]

    error = refusal(cc=names)

    assert error.startswith("cc: display names of ") and str(MAX_NAMES) in error


@pytest.mark.parametrize("field, value", [
    ("subject", "=?x-unknown?q?hi?="),
    ("subject", "Hello =?x-unknown?b?aGk=?= there"),
    ("to", "=?x-unknown?q?hi?= <a@example.org>"),
    ("to", ["=?x-unknown?q?hi?= <a@example.org>"]),
    ("reply_to", "=?x-unknown?q?hi?= <a@example.org>"),
    ("to", "(" * 3000),
    ("to", ["(" * 3000]),
    ("cc", "(" * 3000 + "a@example.org"),
    ("bcc", ["Ada " + "(" * 3000 + " <a@example.org>"]),
])
def test_a_value_the_email_library_cannot_read_is_refused_naming_the_field(field, value):
    error = refusal(**{field: value})

    assert error.startswith(f"{field}: ")
    assert len(error) < 300


def test_a_long_value_is_shown_cut_in_the_error():
    error = refusal(to=["not an address " * 10_000])

    assert error.startswith("to: 'not an address not an address") and "150000 characters" in error
    assert len(error) < 300
