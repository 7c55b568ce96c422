"""One config writer for tests that feed a file source's records through a flow named `sync` (no view server needed)."""
from __future__ import annotations

import json
from pathlib import Path


def write_file_flow(folder: Path, records: list[dict], connectors: str, steps: str) -> Path:
    """agent.toml with a file source `leads` (id `sid`, delivered from the first run), ``connectors`` and the flow `sync` of ``steps``."""
    (folder / "leads.json").write_text(json.dumps({"records": records}))
    cfg = folder / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"
log_level = "WARNING"

[sources.leads]
kind = "file"
path = "leads.json"
id = "sid"
first_run = "deliver"
{connectors}

[[flows]]
name = "sync"
source = "leads"
{steps}
""")
    return cfg
