"""The one place HTTP sessions are built, with auth, for sources and connectors alike."""
from __future__ import annotations

from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from agent.config import BasicAuth, BearerAuth, HeaderAuth

USER_AGENT = "sync-agent/0.1"


class _Session(requests.Session):
    """requests reads the environment's proxy and CA settings again for every request (a scan of os.environ and of
    no_proxy: about a quarter of a call to a fast local sink); here they are read once per origin and arguments."""

    def __init__(self) -> None:
        super().__init__()
        self._settings: dict[tuple, dict] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, tuple(sorted((proxies or {}).items())), stream, verify, cert, self.trust_env)
        if key not in self._settings:
            if len(self._settings) > 256:  # origins are few; a bound all the same
                self._settings.clear()
            self._settings[key] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings = self._settings[key]
        return {**settings, "proxies": dict(settings["proxies"])}


def build_session(auth=None, pool: int = 10) -> requests.Session:
    """A keep-alive session carrying the configured auth; TLS verification stays on."""
    session = _Session()
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
