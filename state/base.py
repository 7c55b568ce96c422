"""The ledger's errors, named by what the caller does next.

    LedgerError              base; the ledger cannot be used (exit status 3)
    ├── LedgerBusy           another agent holds it: stop, try later
    ├── LedgerDamaged        quick_check failed: stop; restore or inspect, never recreate
    └── LedgerUnwritable     cannot create, open or write it (permissions, full disk)
"""


class LedgerError(Exception):
    """The ledger cannot be used."""


class LedgerBusy(LedgerError):
    """Another agent process holds the ledger."""


class LedgerDamaged(LedgerError):
    """The ledger file failed its integrity check."""


class LedgerUnwritable(LedgerError):
    """The ledger cannot be created, opened or written."""
