"""The SQLite ledger: records seen, executions, attempts, cursors, polls."""
