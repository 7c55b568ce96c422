"""compose(): hostile record values are cut or refused by field, never raised and never slow."""
import email
import email.policy

import pytest

from sinks.message import MAX_ADDRESSES, MAX_NAME, MAX_NAMES, MAX_SUBJECT, InvalidMessage, check_sender, compose

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


def library_head(fields: dict, *, sender: str, key: str, now: float) -> bytes:
    """The header block the email library itself writes for the same message (parse and fold of every header)."""
    from datetime import datetime, timezone
    from email.headerregistry import Address
    from email.message import EmailMessage
    from email.utils import format_datetime, getaddresses

    message = EmailMessage(policy=email.policy.SMTP.clone(cte_type="7bit"))
    message["From"] = sender
    for header, field in (("To", "to"), ("Cc", "cc"), ("Reply-To", "reply_to")):
        if fields.get(field):
            values = [fields[field]] if isinstance(fields[field], str) else fields[field]
            message[header] = [Address(display_name=name, addr_spec=addr) for name, addr in getaddresses(values)]
    message["Subject"] = fields["subject"]
    message["Date"] = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    message["Message-ID"] = f"<{key}@{sender.rpartition('@')[2].rstrip('>')}>"
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(fields["text"])
    return message.as_bytes().partition(b"MIME-Version")[0]


@pytest.mark.parametrize("fields, key", [
    ({"to": "sales@example.org", "subject": "New lead: Ada Lovelace"}, "k1"),
    ({"to": "a@example.org", "subject": "s" * 69}, "k1"),                        # "Subject: " + 69 = 78: one line
    ({"to": "a@example.org", "subject": "s" * 70}, "k1"),                        # 79: the library folds it
    ({"to": "a@example.org", "subject": "word " * 20}, "k1"),
    ({"to": "a@example.org", "subject": "Re: =?utf-8?q?caf=C3=A9?= at 5"}, "k1"),  # an encoded word is decoded, then encoded again
    ({"to": "a@example.org", "subject": "a =?x b ?= c"}, "k1"),
    ({"to": "a@example.org", "subject": "  two  spaces  "}, "k1"),
    ({"to": "a@example.org", "subject": 'quotes " and \\ backslash (paren) <angle> ,;:'}, "k1"),
    ({"to": "a@example.org", "subject": "Café"}, "k1"),
    ({"to": '"Smith, John" <j@example.org>, Ada <a@example.org>', "subject": "s"}, "k1"),
    ({"to": ['"O\\"Neil \\\\ Co" <o@example.org>'], "subject": "s"}, "k1"),
    ({"to": "Jürgen <j@example.org>", "cc": "a@example.org (a comment)", "subject": "s"}, "k1"),
    ({"to": ", ".join(f"User {n} <u{n}@example.org>" for n in range(8)), "reply_to": "r@example.org", "subject": "s"}, "k1"),
    ({"to": "=?utf-8?q?Ada?= <a@example.org>", "subject": "s"}, "k1"),
    ({"to": "a@example.org", "subject": "s"}, "a..b=c+d_e-f.g"),
    ({"to": "a@example.org", "subject": "s"}, "x" * 70),                             # a Message-ID too long for a line
])
def test_headers_are_written_byte_for_byte_as_the_email_library_writes_them(fields, key):
    fields = {**fields, "text": "Ada wants a demo."}
    mail = compose(fields, sender=SENDER, key=key, now=1_700_000_000.0)

    assert mail.raw.partition(b"MIME-Version")[0] == library_head(fields, sender=SENDER, key=key, now=1_700_000_000.0)


def test_random_plain_headers_are_written_as_the_email_library_writes_them():
    import random

    rnd = random.Random(12)
    characters = [chr(c) for c in range(32, 127)] + ["  ", "=?", "?="]
    for _ in range(300):
        name = "".join(rnd.choice(characters) for _ in range(rnd.randint(0, 24))).strip()
        fields = {"to": [f'"{name}" <a@example.org>' if '"' not in name and "\\" not in name else "a@example.org"],
                  "subject": "".join(rnd.choice(characters) for _ in range(rnd.randint(1, 80))), "text": "t"}
        try:
            mail = compose(fields, sender=SENDER, key="k1", now=0.0)
        except InvalidMessage:
            continue
        assert mail.raw.partition(b"MIME-Version")[0] == library_head(fields, sender=SENDER, key="k1", now=0.0), fields


@pytest.mark.parametrize("field", ["text", "html"])
def test_a_lone_surrogate_in_the_body_is_refused_naming_the_field(field):
    error = refusal(**{field: "Ada \udc80 wants a demo"})

    assert error.startswith("text or html: cannot be encoded")


def test_a_sender_the_email_library_cannot_put_in_a_from_header_is_refused_with_the_config():
    with pytest.raises(InvalidMessage, match="^sender: cannot be put in a header"):
        check_sender(". <agent@example.org>")


def test_a_base64_body_is_the_same_in_a_file_with_lf_line_ends():
    fields = {**MESSAGE, "text": "Jürgen 中文 " * 20 + "\nsecond line"}
    over_smtp = compose(fields, sender=SENDER, key="k1", now=0.0)
    in_a_file = compose(fields, sender=SENDER, key="k1", now=0.0, linesep="\n")

    assert b"base64" in over_smtp.raw and b"\r\n" not in in_a_file.raw
    decoded = [email.message_from_bytes(mail.raw, policy=email.policy.default).get_payload(decode=True)
               for mail in (over_smtp, in_a_file)]
    assert decoded[0] == decoded[1]


@pytest.mark.parametrize("address", ["=?utf-8?q?hi?=^~~=?b@example.org", "=?utf-8?q?hi?=@example.org", "=?utf-8?b?aGk=?=}@example.org"])
def test_an_encoded_word_the_email_library_refuses_in_a_local_part_is_refused(address):
    assert refusal(to=[address]) == f"to: {address!r} is not a valid address"
