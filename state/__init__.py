"""The ledger: records seen, executions, attempts, cursors, polls; ``open_ledger`` picks its backend."""
from __future__ import annotations

from typing import Callable

from state.base import Ledger

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(location: str) -> bool:
    """A `postgresql://` URL picks PostgreSQL; anything else is the path of a SQLite file."""
    return location.strip().lower().startswith(URL_SCHEMES)


def open_ledger(location: str, *, reader: bool = False, failpoint: Callable[[str], None] = lambda name: None,
                mask: Callable[[str], str] = lambda text: text) -> Ledger:
    """The ledger at ``location`` (a path or a PostgreSQL URL), opened to run an agent on it, or
    (``reader``) beside running agents for an operator's command: no lock, no migration."""
    if is_url(location):
        from state.postgres import PostgresLedger

        return PostgresLedger(location, reader=reader, failpoint=failpoint, mask=mask)
    from state.sqlite import SqliteLedger

    return SqliteLedger(location, hold=not reader, failpoint=failpoint, mask=mask)
