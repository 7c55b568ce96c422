"""The ledger's errors, named by what the caller does next; and ``masked``, the walk that hides secrets in JSON values.

    LedgerError              base; the ledger cannot be used (exit status 3)
    ├── LedgerBusy           another agent holds it: stop, try later
    ├── LedgerDamaged        quick_check failed: stop; restore or inspect, never recreate
    └── LedgerUnwritable     cannot create, open or write it (permissions, full disk)
"""
from __future__ import annotations

from typing import Any, Callable


class LedgerError(Exception):
    """The ledger cannot be used."""


class LedgerBusy(LedgerError):
    """Another agent process holds the ledger."""


class LedgerDamaged(LedgerError):
    """The ledger file failed its integrity check."""


class LedgerUnwritable(LedgerError):
    """The ledger cannot be created, opened or written."""


def masked(value: Any, mask: Callable[[str], str]) -> Any:
    """A JSON-like value with every string in it (keys too) passed through ``mask``: the same shape, still JSON.

    Iterative: a value nested as deep as JSON can be read costs no recursion."""
    root: list = [None]
    todo = [(value, root, 0)]
    while todo:
        item, parent, slot = todo.pop()
        if isinstance(item, str):
            parent[slot] = mask(item)
        elif isinstance(item, dict):
            parent[slot] = copy = {}
            for k, v in item.items():
                key = mask(k) if isinstance(k, str) else k
                copy[key] = None  # the keys keep their order; values are filled in later
                todo.append((v, copy, key))
        elif isinstance(item, (list, tuple)):
            parent[slot] = copy = [None] * len(item)
            todo.extend((v, copy, i) for i, v in enumerate(item))
        else:
            parent[slot] = item
    return root[0]
