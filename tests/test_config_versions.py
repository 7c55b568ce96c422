"""Config changes keep the promise: versions in the ledger, work pinned to its flow version, step ids, re-keying.

The real CLI in-process against a real HTTP sink on 127.0.0.1 that records
every request with its idempotency key, and a file source or a view server.
"""
import json
import sqlite3
from pathlib import Path

import pytest

from agent.cli import main
from sinkserver import SinkServer


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
    with sqlite3.connect(tmp_path / "var" / "agent.db") as db:  # the index re-keying read was for its poll only
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records' AND sql LIKE '%hash%'").fetchall() == []
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


# work pinned to its flow version -----------------------------------------------------------------------

def two_step_config(folder: Path, sink_url: str, *, first: str = "", ids: bool = False, literal_token: str | None = None) -> Path:
    """A flow `send B` -> `send A` (optionally after an inserted first step), A retried quickly."""
    steps = first + f"""
  [[flows.steps]]
  kind = "action"
  {'id = "b"' if ids else ''}
  action = "api > b > send"
  [[flows.steps]]
  kind = "action"
  {'id = "a"' if ids else ''}
  action = "api > a > send"
  retry = {{ interval = "100ms", jitter = false }}
"""
    cfg = file_config(folder, sink_url, steps=steps)
    text = cfg.read_text().replace('[connectors.api.objects.people]\npath = "/people"',
                                   '[connectors.api.objects.a]\npath = "/a"\n[connectors.api.objects.b]\npath = "/b"\n'
                                   '[connectors.api.objects.c]\npath = "/c"')
    if literal_token:
        text = text.replace('idempotency_header = "Idempotency-Key"', f'idempotency_header = "Idempotency-Key"\nauth = {{ kind = "bearer", token = "{literal_token}" }}')
    cfg.write_text(text)
    return cfg


INSERTED_C = '''
  [[flows.steps]]
  kind = "action"
  id = "c"
  action = "api > c > send"
'''


def requests_by_path(sink) -> dict[str, list[tuple[str, str]]]:
    """path -> [(record sid, idempotency key)] of every POST, in order."""
    out: dict[str, list] = {}
    for r in sink.requests_to("POST"):
        out.setdefault(r["path"], []).append((r["json"]["sid"], r["headers"]["Idempotency-Key"]))
    return out


def fail_a_until(sink, released: list) -> None:
    sink.fail_when(lambda r: r["path"] == "/a" and not released, 503)


def test_a_step_inserted_while_work_waits_sends_nothing_twice_and_skips_nothing(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE)
    released: list = []
    fail_a_until(sink, released)
    cfg = two_step_config(tmp_path, sink.url)
    code, out, _ = cli(capfd, cfg, "run", "--once")
    assert "waiting: 2" in out
    two_step_config(tmp_path, sink.url, first=INSERTED_C)  # the operator inserts a first step while A waits
    write_people(tmp_path, PEOPLE + [{"sid": "S3", "uuid": "u-3", "name": "Hedy"}])  # new work comes under the new version
    released.append(True)
    import time
    time.sleep(0.15)  # the retry interval of A
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 0 and "waiting: 0" in out, err
    sent = requests_by_path(sink)
    assert sorted(sid for sid, _ in sent["/b"]) == ["S1", "S2", "S3"]  # B once per record: never again for S1, S2
    assert [sid for sid, _ in sent["/c"]] == ["S3"]  # the inserted step runs for work admitted under the new version
    a_keys = {}
    for sid, key in sent["/a"]:
        a_keys.setdefault(sid, set()).add(key)
    assert all(len(keys) == 1 for keys in a_keys.values()) and sorted(a_keys) == ["S1", "S2", "S3"]  # A: one key per record, its own
    a_all = {key for keys in a_keys.values() for key in keys}
    b_and_c = {key for path in ("/b", "/c") for _, key in sent[path]}
    assert not b_and_c & a_all  # no key crosses from one step to another
    assert len({key for _, key in sent["/b"]}) == 3 and a_all <= set(sink.accepted) and sink.replays == 0


def test_a_ledger_from_the_previous_schema_finishes_its_work_under_the_keys_it_had(tmp_path, capfd, sink):
    """tests/data/ledger-schema1.db: written by the agent before config versions, with a flow B -> A where A
    was waiting (503) for records S1 and S2; its A attempts used the keys below."""
    import shutil
    (tmp_path / "var").mkdir(mode=0o700)
    shutil.copy(Path(__file__).parent / "data" / "ledger-schema1.db", tmp_path / "var" / "agent.db")
    write_people(tmp_path, [{"sid": "S1", "name": "Ada"}, {"sid": "S2", "name": "Grace"}])
    cfg = two_step_config(tmp_path, sink.url)
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 0 and "new: 0" in out and "waiting: 0" in out, out + err
    sent = requests_by_path(sink)
    assert "/b" not in sent  # B had been sent before the upgrade
    assert sorted(sent["/a"]) == [("S1", "9ab626ef35f6f92f3b0163e981157babdd0799f0"), ("S2", "4e4acefc8e1b9f0d6aa2ac9d2b13397d12449a5b")]
    assert cli(capfd, cfg, "config", "history", "--json")[0] == 0
    main(["--config", str(cfg), "executions", "--json"])
    assert {row["version"] for row in json.loads(capfd.readouterr().out)} == {1}


def test_upgrade_moves_waiting_work_by_step_id_and_keeps_its_keys(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE)
    released: list = []
    fail_a_until(sink, released)
    cfg = two_step_config(tmp_path, sink.url, ids=True)
    cli(capfd, cfg, "run", "--once")
    before = {sid: key for sid, key in requests_by_path(sink)["/a"]}
    two_step_config(tmp_path, sink.url, first=INSERTED_C, ids=True)
    code, out, _ = cli(capfd, cfg, "executions", "upgrade", "--json")
    report = json.loads(out)
    assert code == 0 and len(report["moved"]) == 2 and report["refused"] == [] and report["version"] == 2
    main(["--config", str(cfg), "executions", "--json"])
    assert {(row["version"], row["step"]) for row in json.loads(capfd.readouterr().out)} == {(2, 2)}  # A, now third
    released.append(True)
    import time
    time.sleep(0.15)
    assert cli(capfd, cfg, "run", "--once")[0] == 0
    after = requests_by_path(sink)
    assert {sid: key for sid, key in after["/a"][-2:]} == before  # the same keys: the step kept its id
    assert "/c" not in after and len(after["/b"]) == 2  # they stood past C; B is not sent again


def test_upgrade_refuses_a_step_without_an_id_and_says_why(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE[:1])
    fail_a_until(sink, [])
    cfg = two_step_config(tmp_path, sink.url)
    cli(capfd, cfg, "run", "--once")
    two_step_config(tmp_path, sink.url, first=INSERTED_C)
    code, out, _ = cli(capfd, cfg, "executions", "upgrade")
    assert code == 1 and "moved 0" in out and "has no id in config version 1" in out


def test_history_show_and_diff(tmp_path, capfd, sink):
    write_people(tmp_path, PEOPLE)
    cfg = two_step_config(tmp_path, sink.url, ids=True, literal_token="tok-LITERAL-9876")
    cli(capfd, cfg, "run", "--once")
    cli(capfd, cfg, "run", "--once")  # the same config: the same version
    two_step_config(tmp_path, sink.url, first=INSERTED_C, ids=True, literal_token="tok-LITERAL-9876")
    cli(capfd, cfg, "run", "--once")
    code, out, _ = cli(capfd, cfg, "config", "history", "--json")
    history = json.loads(out)
    assert [(v["number"], v["current"]) for v in history] == [(1, False), (2, True)]
    assert history[1]["changes"] == {"flows": {"added": [], "removed": [], "edited": ["people"]}}
    code, out, _ = cli(capfd, cfg, "config", "show", "1")
    assert code == 0 and 'token = "***"' in out and "tok-LITERAL" not in out and 'id = "c"' not in out
    (tmp_path / "rolled-back.toml").write_text(out)  # `config show 1 > agent.toml` is a rollback (secrets masked)
    code, out, _ = cli(capfd, cfg, "config", "diff", "1", "2", "--json")
    diff = json.loads(out)
    assert diff["changes"]["flows"]["edited"] == ["people"] and '+  id = "c"' in diff["diff"]
    code, out, _ = cli(capfd, cfg, "status")
    assert "config: version 2 of 2" in out
    for file in (tmp_path / "var").iterdir():
        assert b"tok-LITERAL-9876" not in file.read_bytes(), file
