"""The one place HTTP sessions are built, with auth, for sources and connectors alike."""
from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

from agent.config import BasicAuth, BearerAuth, HeaderAuth

USER_AGENT = "sync-agent/0.1"


def build_session(auth=None, pool: int = 10) -> requests.Session:
    """A keep-alive session carrying the configured auth; TLS verification stays on."""
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    adapter = HTTPAdapter(pool_connections=pool, pool_maxsize=pool, max_retries=0)  # retries are the agent's, by policy
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if isinstance(auth, BasicAuth):
        session.auth = (auth.username, auth.password.get_secret_value())
    elif isinstance(auth, BearerAuth):
        session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    elif isinstance(auth, HeaderAuth):
        session.headers[auth.name] = auth.value.get_secret_value()
    return session
