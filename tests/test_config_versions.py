"""Config changes keep the promise: versions in the ledger, work pinned to its flow version, step ids, re-keying.

The real CLI in-process against a real HTTP sink on 127.0.0.1 that records
every request with its idempotency key, and a file source or a view server.
"""
import json
from pathlib import Path

import pytest

from agent.cli import main
from sinkserver import SinkServer
from viewserver import ViewServer, make_leads


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def cli(capfd, cfg: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(cfg), *args])
    out, err = capfd.readouterr()
    return code, out, err


def file_config(folder: Path, sink_url: str, *, id_field: str = "sid", steps: str = "", source_extra: str = "") -> Path:
    cfg = folder / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"

[sources.people]
kind = "file"
path = "people.json"
id = "{id_field}"
first_run = "deliver"
{source_extra}

[connectors.api]
kind = "http"
base_url = "{sink_url}"
idempotency_header = "Idempotency-Key"
[connectors.api.objects.people]
path = "/people"

[[flows]]
name = "people"
source = "people"
{steps or '''
  [[flows.steps]]
  kind = "action"
  action = "api > people > send"
'''}
""")
    return cfg


def write_people(folder: Path, people: list[dict]) -> None:
    (folder / "people.json").write_text(json.dumps({"records": people}))


PEOPLE = [{"sid": "S1", "uuid": "u-1", "name": "Ada"}, {"sid": "S2", "uuid": "u-2", "name": "Grace"}]


# re-keying -------------------------------------------------------------------------------------------

def test_changing_the_id_field_does_not_send_known_records_again(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE)
    cfg = file_config(tmp_path, sink.url, id_field="sid")
    code, out, _ = cli(capfd, cfg, "run", "--once")
    assert code == 0 and "sent: 2" in out
    file_config(tmp_path, sink.url, id_field="uuid")
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 0 and "sent: 0" in out and "new: 0" in out
    assert "re-keyed 2 record(s)" in err and "id 'sid' -> 'uuid'" in err
    write_people(tmp_path, PEOPLE + [{"sid": "S3", "uuid": "u-3", "name": "Hedy"}, {**PEOPLE[0], "uuid": "u-1b", "name": "Ada L."}])
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert "sent: 2" in out and "re-keyed" not in err  # the identity is settled: new versions are delivered as usual
    assert len(sink.requests_to("POST")) == 4


def test_changing_the_dedupe_mode_recognises_what_was_sent(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE)
    cfg = file_config(tmp_path, sink.url)
    cli(capfd, cfg, "run", "--once")
    file_config(tmp_path, sink.url, source_extra='dedupe = "content"')
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert "sent: 0" in out and "re-keyed 2" in err
    assert len(sink.requests_to("POST")) == 2


def test_a_new_view_is_a_new_source_and_first_run_decides(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE)
    (tmp_path / "other.json").write_text(json.dumps({"records": [{"sid": "T1", "name": "Katherine"}]}))
    cfg = file_config(tmp_path, sink.url)
    cli(capfd, cfg, "run", "--once")
    cfg.write_text(cfg.read_text().replace('path = "people.json"', 'path = "other.json"').replace('first_run = "deliver"', 'first_run = "skip"'))
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert "another view" in err and "primed: 1" in out and "sent: 0" in out
