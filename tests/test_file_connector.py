"""The file connector: one JSON line per key, durable, across restarts and threads."""
from __future__ import annotations

import json
import threading

import pydantic
import pytest

from sinks.base import Action, ActionError
from sinks.file import FileConnector

NOW = 1_700_000_000.0
WRITE = Action("record", "write")


@pytest.fixture
def out(tmp_path):
    """Where the connector writes, in a directory that does not exist yet."""
    return tmp_path / "var" / "out.jsonl"


def make(path) -> FileConnector:
    """A file connector on `path` with a fixed clock."""
    return FileConnector(FileConnector.Config.model_validate({"kind": "file", "path": str(path)}), session=None, clock=lambda: NOW)


def lines(path) -> list[dict]:
    """Every line of the file, parsed."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_one_line_per_key_and_creates_directories(out):
    sink = make(out)
    outcome = sink.run(WRITE, {"body": {"a": 1}}, "k1")
    assert (outcome.status, outcome.output) == ("succeeded", {"duplicate": False})
    assert lines(out) == [{"key": "k1", "body": {"a": 1}, "written": "2023-11-14T22:13:20+00:00"}]
    assert out.read_bytes().endswith(b"\n")


def test_skips_a_key_already_written(out):
    sink = make(out)
    sink.run(WRITE, {"body": {"a": 1}}, "k1")
    again = sink.run(WRITE, {"body": {"a": 2}}, "k1")
    assert (again.status, again.output) == ("succeeded", {"duplicate": True})
    assert [line["body"] for line in lines(out)] == [{"a": 1}]


def test_remembers_keys_across_a_restart(out):
    first = make(out)
    first.run(WRITE, {"body": 1}, "k1")
    first.close()
    second = make(out)
    assert second.run(WRITE, {"body": 1}, "k1").output == {"duplicate": True}
    assert second.run(WRITE, {"body": 2}, "k2").output == {"duplicate": False}
    assert [line["key"] for line in lines(out)] == ["k1", "k2"]


def test_a_torn_last_line_is_cut_and_its_key_written_again(out):
    make(out).run(WRITE, {"body": 1}, "k1")
    with out.open("ab") as f:
        f.write(b'{"key":"k2","body":{"na')  # a crash in the middle of a write
    sink = make(out)
    assert sink.run(WRITE, {"body": 1}, "k1").output == {"duplicate": True}
    assert sink.run(WRITE, {"body": 2}, "k2").output == {"duplicate": False}
    assert [(line["key"], line["body"]) for line in lines(out)] == [("k1", 1), ("k2", 2)]


def test_a_whole_last_line_without_newline_is_kept(out):
    out.parent.mkdir(parents=True)
    out.write_bytes(b'{"key":"k1","body":1,"written":"x"}')
    sink = make(out)
    assert sink.run(WRITE, {"body": 1}, "k1").output == {"duplicate": True}
    sink.run(WRITE, {"body": 2}, "k2")
    assert [line["key"] for line in lines(out)] == ["k1", "k2"]


def test_foreign_lines_are_tolerated(out):
    out.parent.mkdir(parents=True)
    out.write_bytes(b'not json\n[1, 2]\n{"key": 5}\n\n')
    sink = make(out)
    assert sink.run(WRITE, {"body": 1}, "k1").output == {"duplicate": False}
    assert out.read_bytes().endswith(b'{"key": 5}\n\n' + json.dumps({"key": "k1", "body": 1, "written": "2023-11-14T22:13:20+00:00"}, separators=(",", ":")).encode() + b"\n")


def test_concurrent_writers_write_each_key_once(out):
    sink = make(out)
    outcomes = []

    def deliver(worker):
        for n in range(25):
            outcomes.append(sink.run(WRITE, {"body": {"n": n, "worker": worker}}, f"k{n}"))

    threads = [threading.Thread(target=deliver, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 200 and {o.status for o in outcomes} == {"succeeded"}
    assert sum(not o.output["duplicate"] for o in outcomes) == 25
    assert sorted(line["key"] for line in lines(out)) == sorted(f"k{n}" for n in range(25))


def test_an_unwritable_path_pauses(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    outcome = make(blocker / "sub" / "out.jsonl").run(WRITE, {"body": 1}, "k1")
    assert (outcome.status, outcome.condition) == ("paused", "io")
    assert "cannot write" in outcome.error


def test_a_failed_write_is_retried_after_a_pause(out, monkeypatch):
    sink = make(out)
    sink.run(WRITE, {"body": 1}, "k1")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("sinks.file.os.fsync", disk_full)
        paused = sink.run(WRITE, {"body": 2}, "k2")
    assert (paused.status, "No space left" in paused.error) == ("paused", True)
    # the line may have reached the file before the fsync failed: the reread counts it, nothing is doubled
    assert sink.run(WRITE, {"body": 2}, "k2").status == "succeeded"
    assert [line["key"] for line in lines(out)] == ["k1", "k2"]


def test_a_body_that_is_not_json_fails(out):
    outcome = make(out).run(WRITE, {"body": {"x": float("inf")}}, "k1")
    assert (outcome.status, outcome.condition) == ("failed", "input")
    assert not out.exists()


def test_a_lone_surrogate_is_written_escaped(out):
    sink = make(out)
    assert sink.run(WRITE, {"body": "\ud800"}, "k1").status == "succeeded"
    assert lines(out)[0]["body"] == "\ud800"


def test_unknown_action_is_a_programming_error(out):
    with pytest.raises(ActionError, match="record > write"):
        make(out).run(Action("message", "send"), {}, "k1")


def test_config():
    config = FileConnector.Config.model_validate({"kind": "file", "path": "var/out.jsonl"})
    assert list(config.actions()) == [WRITE]
    assert config.actions()[WRITE].model_validate({}).body == {}
    with pytest.raises(pydantic.ValidationError, match="mode"):
        FileConnector.Config.model_validate({"kind": "file", "path": "x", "mode": "w"})
    with pytest.raises(pydantic.ValidationError):
        FileConnector.Config.model_validate({"kind": "http", "path": "x"})
