"""Masking: every configured secret, in every form a server may echo it back, becomes ``***``.

One ``Masker`` is built from the config (``Masker.of(config)``) and used wherever text
leaves the process or enters the ledger: the log patcher, every CLI printer, and the
ledger itself (injected there as a plain ``str -> str`` callable). Besides each secret
it hides the forms in which credentials travel, since an error page or an SMTP reply
may quote the request that carried them::

    the secret stripped of surrounding blanks
    its JSON-, repr- and URL-escaped text      a body, an error or a query that quotes it
    base64(secret)                             SMTP AUTH LOGIN
    base64(user:password)                      HTTP Basic
    base64(\\0user\\0password)                   SMTP AUTH PLAIN

A secret shorter than 4 characters is not masked: replacing it everywhere would
mangle ordinary text (its login forms, being longer, still are).
"""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Iterable
from urllib.parse import quote, unquote, urlsplit

from pydantic import SecretStr

from state.base import masked  # noqa: F401  (re-exported: one walk over JSON values for the ledger and the agent)

MASK = "***"
SHORTEST = 4


class Masker:
    """``masker(text)``: ``text`` with every form of every configured secret replaced by ``***``."""

    def __init__(self, secrets: Iterable[str] = (), logins: Iterable[tuple[str, str]] = ()):
        forms: set[str] = set()
        for secret in secrets:
            forms |= _forms(secret)
        for user, password in logins:
            forms |= _forms(password) | _login_forms(user, password)
        self.forms = sorted(forms, key=len, reverse=True)  # longest first: a form inside a longer one is not cut in two
        self._pattern = re.compile("|".join(map(re.escape, self.forms))) if self.forms else None

    @classmethod
    def of(cls, config: Any) -> "Masker":
        """The masker for a loaded config: its secrets, its logins and any password written into a URL."""
        secrets, logins = list(config.secrets), []
        for holder in [*config.auth.values(), *config.connectors.values()]:
            user, password = getattr(holder, "username", None), getattr(holder, "password", None)
            if isinstance(user, str) and isinstance(password, SecretStr):
                logins.append((user, password.get_secret_value()))
        for cfg in [*config.sources.values(), *config.connectors.values()]:
            user, password = _userinfo(getattr(cfg, "url", None) or getattr(cfg, "base_url", None))
            if password:
                secrets.append(password)  # as written, percent-encoded
                logins.append((unquote(user), unquote(password)))  # as sent
        return cls(secrets, logins)

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)


def _forms(secret: str) -> set[str]:
    """The secret as written, stripped, JSON-escaped, URL-encoded and in base64."""
    out: set[str] = set()
    for text in {secret, secret.strip()}:
        if len(text.strip()) < SHORTEST:
            continue
        out |= {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], repr(text)[1:-1], quote(text, safe=""), *_base64(text)}
    return out


def _login_forms(user: str, password: str) -> set[str]:
    """HTTP Basic and SMTP AUTH PLAIN credentials, as sent."""
    if not password:
        return set()
    return {form for secret in {password, password.strip()} for joined in (f"{user}:{secret}", f"\0{user}\0{secret}")
            for form in _base64(joined)}


def _base64(text: str) -> set[str]:
    """base64 of the text's UTF-8 bytes, and of its Latin-1 bytes (what requests sends for Basic auth) when it has them."""
    out = {base64.b64encode(text.encode()).decode()}
    try:
        out.add(base64.b64encode(text.encode("latin-1")).decode())
    except UnicodeEncodeError:
        pass
    return out


def _userinfo(url: Any) -> tuple[str, str]:
    """(user, password) as written into a URL; empty when it has none."""
    try:
        parts = urlsplit(str(url or ""))
    except ValueError:
        return "", ""
    return parts.username or "", parts.password or ""
