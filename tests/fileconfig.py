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


# A real config with no file in it: a rest source (`{view}`: its URL), an http and an smtp connector (on a closed
# port: commands that read the config and ledger reach neither). bench/startup.py times `status` on it;
# tests/test_cli_fast.py checks what `status` loads for it.
REST_HTTP_SMTP = """
[agent]
ledger = "var/agent.db"

[sources.leads]
kind = "rest"
url = "{view}"
every = "5m"
id = "lastSubmissionID"
updated = "lastModified"
entity = "RecordId"
first_run = "skip"
params = {{ since = "{{{{ cursor }}}}" }}
auth = {{ kind = "basic", username = "integration", password = "${{VIEW_PASSWORD:-not-checked}}" }}
paging = {{ kind = "page", param = "page", size_param = "pageSize", size = 100, start = 1 }}

[connectors.crm]
kind = "http"
base_url = "http://127.0.0.1:9/api"
auth = {{ kind = "bearer", token = "${{CRM_TOKEN:-not-used}}" }}
idempotency_header = "Idempotency-Key"
[connectors.crm.objects.leads]
path = "/leads"
key = "email"

[connectors.mail]
kind = "smtp"
host = "127.0.0.1"
port = 9
security = "none"
sender = "sync-agent@example.invalid"

[[flows]]
name = "leads-to-crm"
source = "leads"

  [[flows.steps]]
  kind = "map"
  fields = {{ email = "{{{{ record.Email | lower }}}}", name = "{{{{ record.FirstName }}}} {{{{ record.LastName }}}}" }}

  [[flows.steps]]
  kind = "action"
  action = "crm > leads > upsert"
  body = "mapped"

[[flows]]
name = "lead-email"
source = "leads"

  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = "sales@example.invalid"
  subject = "New lead: {{{{ record.FirstName }}}} {{{{ record.LastName }}}}"
  text = "{{{{ record | tojson(indent=2) }}}}"
"""
