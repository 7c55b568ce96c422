"""The fault suite (issue 4): the kill storm and its negative controls, two agents at once, a full disk, a damaged ledger.

All of it runs the real CLI as subprocesses against a real view server and a real
idempotent HTTP sink on 127.0.0.1 (see ``storm.py`` for how the storm works; its
generations are forked from a parent that imported the agent once,
``STORM_FORK=0`` starts each with ``python -m agent``). The
storm's view changes while it is polled: records are added, updated (sometimes
with the old version left beside the new one, on a later page), deleted (also
while a poll pages through it), and one record is dated 9999-12-31 throughout.

The storm's size is a parameter: ``STORM_KILLS`` (default 20, the CI size),
``STORM_SEED`` (default 4), ``STORM_MIN_FIRINGS`` (how often every failpoint
must fire: 2 by default, 10 from 100 kills on). ``STORM_PARTS`` (default 1)
shares them out over that many independent storms (seeds ``STORM_SEED``,
``STORM_SEED + 100``, ...), each judged in full on its own, so that parallel
workers run them side by side: every part gets its share of the kills and
must see every failpoint fire its share of the firings (rounded up), its own
SIGTERM in the middle and its own drain. (In the whole suite one storm does
better: it starts first, ends long before the suite, and costs less than two
halves, each with its own drain.) A long run by hand:

    STORM_KILLS=200 .venv/bin/python -m pytest tests/test_fault_storm.py -s -k kill_storm
    STORM_KILLS=200 STORM_PARTS=4 .venv/bin/python -m pytest tests/test_fault_storm.py -s -k kill_storm -n 4

``STORM_CONTROLS=all`` runs every negative control (a planted bug the storm must
catch: a fresh key per attempt, done before sent, a resend, a cursor without
overlap, a cursor moved by a far-future date, pages trusted though the view
shifted under them, versions ordered by arrival), not only the fresh-key one;
``STORM_PAIRS`` sets how many pairs of agents race for one ledger (default 5).
"""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sinkserver import SinkServer
from storm import PASSWORD, Launcher, Storm, agent_env, write_config
from viewserver import ViewServer, make_leads

KILLS = int(os.environ.get("STORM_KILLS", "20"))
SEED = int(os.environ.get("STORM_SEED", "4"))
MIN_FIRINGS = int(os.environ.get("STORM_MIN_FIRINGS", "10" if KILLS >= 100 else "2"))
PARTS = max(1, int(os.environ.get("STORM_PARTS", "1")))
# The storm's short timeouts are faults it provokes on purpose. The tests that are not storms are about the ledger and
# the processes; on a busy machine, a page of 300 padded records can take longer than the storm's 0.5 s to serve.
CALM = {"view_timeout": 10.0, "sink_timeout": 10.0}


def storm_parts(kills: int, min_firings: int, parts: int, seed: int) -> list[tuple[int, int, int]]:
    """(seed, kills, min_firings) of each part: the kills shared out, the firings each part must see rounded up."""
    parts = max(1, min(parts, kills or 1))
    firings = -(-min_firings // parts)
    return [(seed + 100 * part, kills // parts + (part < kills % parts), firings) for part in range(parts)]


def test_the_parts_of_the_storm_cover_all_of_it():
    for kills, firings, parts in [(20, 2, 2), (20, 2, 1), (21, 2, 4), (200, 10, 3), (3, 2, 5), (0, 2, 2)]:
        shares = storm_parts(kills, firings, parts, SEED)
        assert sum(k for _, k, _ in shares) == kills and sum(f for _, _, f in shares) >= firings
        assert len({seed for seed, _, _ in shares}) == len(shares) and shares[0][0] == SEED


def test_the_slowest_tests_start_first_each_on_a_worker_of_its_own():
    from conftest import SLOW, start_order

    for nodeid in SLOW:  # a renamed test would silently lose its place at the head
        module, name = nodeid.split("::")
        assert f"def {name}(" in (Path(__file__).parent.parent / module).read_text(), f"conftest.SLOW names no test: {nodeid}"
    seconds = {"storm[one]": 17, "storm[two]": 16, "pg": 12, "chaining": 6, "thousand": 5}
    nodeids = ["a", "thousand", "b", "chaining", "storm[one]", "c", "pg", "storm[two]"]

    def order(workers: int) -> list[str]:
        return [nodeids[i] for i in start_order(nodeids, workers, lambda nodeid: seconds.get(nodeid, 0))]

    # xdist hands one worker the first two, the other the next two: the longest goes with the shorter of the next
    assert order(2) == ["storm[one]", "chaining", "storm[two]", "pg", "thousand", "a", "b", "c"]
    assert order(1) == ["storm[one]", "storm[two]", "pg", "chaining", "thousand", "a", "b", "c"]
    assert order(3) == ["storm[one]", "thousand", "storm[two]", "chaining", "pg", "a", "b", "c"]
    assert order(8) == ["storm[one]", "a", "storm[two]", "b", "pg", "c", "chaining", "thousand"]


@pytest.mark.parametrize("seed,kills,min_firings", [pytest.param(*part, id=f"seed{part[0]}-{part[1]}kills")
                                                      for part in storm_parts(KILLS, MIN_FIRINGS, PARTS, SEED)])
def test_kill_storm(tmp_path, seed, kills, min_firings):
    started = time.monotonic()
    report = Storm(tmp_path, kills=kills, seed=seed, min_firings=min_firings).run()
    print(f"\nkill storm: seed {seed}, {kills} kills, every failpoint {min_firings}x (STORM_KILLS={KILLS} STORM_SEED={SEED} "
          f"STORM_MIN_FIRINGS={MIN_FIRINGS} STORM_PARTS={PARTS}), {time.monotonic() - started:.1f}s")
    print(report.text())
    assert report.figures["SIGKILLs sent"] >= kills
    assert [rc for rc, _ in report.figures["SIGTERM stops (exit, seconds)"]] == [0, 0]  # mid-storm and after draining
    assert not report.problems, report.text()


def test_a_launched_agent_runs_the_cli_in_its_folder_environment_and_files_and_ends_as_a_process_does(tmp_path):
    """What the storms' generations are: `python -m agent ARGS`, forked from a parent that imported the agent."""
    with SinkServer(key_field="sink_id") as sink, \
            ViewServer(make_leads(3), page_size=10, username="integration", password=PASSWORD) as view:
        write_config(tmp_path, view.url, sink.url, **CALM)
        launcher = Launcher(agent_env(), tmp_path / "launcher.err")
        try:
            files = [tmp_path / name for name in ("once.out", "once.err", "run.out", "run.err", "bad.out", "bad.err")]
            once = launcher.start(["--config", "agent.toml", "run", "--once"], tmp_path, *files[:2], agent_env(STORM_GENERATION="7"))
            assert once.wait(30) == 0, files[1].read_text()
            assert "sent: 3" in files[0].read_text() and once.pid != launcher.proc.pid, files[0].read_text() + files[1].read_text()
            assert {r["headers"]["X-Storm-Generation"] for r in sink.requests} == {"7"}  # its own environment

            running = launcher.start(["--config", "agent.toml", "run"], tmp_path, *files[2:4], agent_env())
            assert _wait_for(lambda: "agent running" in files[3].read_text(), 20), files[3].read_text()
            running.send_signal(signal.SIGTERM)
            assert running.wait(20) == 0 and "agent stopped" in files[3].read_text(), (running.returncode, files[3].read_text())
            killed = launcher.start(["--config", "agent.toml", "run"], tmp_path, *files[2:4], agent_env())
            killed.kill()
            assert killed.wait(20) == -signal.SIGKILL and killed.poll() == -signal.SIGKILL, (killed.returncode, files[3].read_text())

            bad = launcher.start(["--config", "missing.toml", "run"], tmp_path, *files[4:], agent_env())
            assert bad.wait(20) == 2 and "missing.toml" in files[5].read_text() and "Traceback" not in files[5].read_text(), \
                (bad.returncode, files[5].read_text())
        finally:
            launcher.close()
        assert launcher.proc.returncode == 0, (tmp_path / "launcher.err").read_text()


# Each plant is a bug put into the agent processes from outside (a sitecustomize module; see storm.PLANTS),
# with the storm options that reach it and a problem the storm must then report.
CONTROLS = {
    "fresh_key": ({"points": (), "base_chance": 0}, "accepted under 2 different idempotency keys"),
    "done_before_send": ({"points": ("after_claim",)}, "was never delivered"),
    "cursor_gt": ({"points": (), "base_chance": 0}, "current version"),
    "resend_sent": ({"points": (), "base_chance": 0}, "sent again by the same agent process"),
    "future_cursor": ({"points": (), "base_chance": 0}, "current version"),
    # longer storms, with a new time every burst, fewer failed polls and many deletions while paging: a skipped
    # record is lost only when a poll that skipped it moves the cursor past it
    "no_reread": ({"points": (), "base_chance": 0, "kills": 10, "bursts_per_tick": 1, "view_fault_rate": 0.05,
                   "view_changes": {"paging_delete_chance": 0.7}}, "current version"),
    # ... and most updates beside the old version: a pair whose newer version is read first is needed
    "arrival_order": ({"points": (), "base_chance": 0, "kills": 10, "view_changes": {"keep_chance": 0.5}},
                      "was delivered before the older version"),
}


# CI plants the bug the guarantee hinges on; STORM_CONTROLS=all plants every one (about 2 minutes more).
PLANTS = sorted(CONTROLS) if os.environ.get("STORM_CONTROLS") == "all" else ["fresh_key"]


@pytest.mark.parametrize("plant", PLANTS)
def test_the_storm_catches_a_planted_bug(tmp_path, plant):
    options, expected = CONTROLS[plant]
    report = Storm(tmp_path, **{"kills": 3, "seed": SEED, "plant": plant, "drain_timeout": 20, **options}).run()
    print(f"\nplanted bug {plant}:\n{report.text()}")
    assert report.has(expected), report.text()


# -- two agents at once ---------------------------------------------------------------------------

def _popen(cfg: Path, folder: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    err = folder / f"{name}.err"
    with open(folder / f"{name}.out", "w") as out, open(err, "w") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run", *args], cwd=cfg.parent,
                                stdout=out, stderr=errors, stdin=subprocess.DEVNULL, env=agent_env())
    return proc, err


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _stop(proc: subprocess.Popen, err: Path) -> int:
    """SIGTERM once the agent runs (its handler is installed); the exit status, or None after 20 s."""
    assert _wait_for(lambda: proc.poll() is not None or "agent running" in err.read_text(), 20)
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def test_two_agents_started_at_once_one_runs_the_other_exits_3(tmp_path):
    pairs = int(os.environ.get("STORM_PAIRS", "5"))
    logs = tmp_path / "logs"
    logs.mkdir()
    with SinkServer(key_field="sink_id") as sink, \
            ViewServer(make_leads(12), page_size=10, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view.url, sink.url, **CALM)
        ledger = tmp_path / "var" / "agent.db"
        for pair in range(pairs):
            view.records.append(make_leads(1, start=f"2027-04-01T00:{pair:02d}:00Z")[0])
            (a, a_err), (b, b_err) = _popen(cfg, logs, f"{pair}a"), _popen(cfg, logs, f"{pair}b")
            assert _wait_for(lambda: a.poll() is not None or b.poll() is not None, 20), f"pair {pair}: neither agent gave way"
            exited = [(p, e) for p, e in ((a, a_err), (b, b_err)) if p.poll() is not None]
            assert len(exited) == 1, f"pair {pair}: both exited: {a.returncode} {b.returncode}\n{a_err.read_text()}\n{b_err.read_text()}"
            [(loser, loser_err)] = exited
            (winner, winner_err), = [(p, e) for p, e in ((a, a_err), (b, b_err)) if p is not loser]
            message = loser_err.read_text()
            assert loser.returncode == 3, message
            assert str(ledger) in message and "another agent is running" in message
            assert "Traceback" not in message
            assert _stop(winner, winner_err) == 0, winner_err.read_text()
            assert "Traceback" not in winner_err.read_text()
        # a winner stopped at once may leave work waiting (a stop claims nothing more): one more run finishes it
        rest, rest_err = _popen(cfg, logs, "rest", "--once")
        assert rest.wait(timeout=30) == 0, rest_err.read_text()
        versions = [r["json"]["version"] for r in sink.requests_to("POST")]
    every = {r["lastSubmissionID"] for r in view.records}
    assert set(versions) == every  # the winners did the work ...
    assert len(versions) == len(every) and sink.replays == 0  # ... once


# -- a full disk ------------------------------------------------------------------------------------

@pytest.fixture
def ledger_disk(tmp_path):
    """A 16 MB tmpfs mounted where the config puts the ledger (tmp_path/var); skipped when it cannot be mounted."""
    var = tmp_path / "var"
    var.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(var)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot put the ledger on a tiny tmpfs to fill it")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs for the ledger (root with CAP_SYS_ADMIN needed): {mounted.stderr.strip()}")
    try:
        yield var
    finally:
        subprocess.run(["umount", "-l", str(var)], capture_output=True)


def _fill(disk: Path, spare: int) -> Path:
    """Fill the disk, leaving about `spare` bytes."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        left = max(0, stat.f_bavail * stat.f_frsize - spare)
        while left > 0:
            left -= f.write(b"\0" * min(left, 1 << 20))
    return filler


def _padded_leads(n: int, start: str) -> list[dict]:
    leads = make_leads(n, start=start)
    for lead in leads:
        lead["Notes"] = "n" * 2000  # a few pages of ledger per page of view
    return leads


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _intents(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT key FROM executions")}
    finally:
        conn.close()


def _once(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), "run", "--once"], capture_output=True,
                          text=True, timeout=120, cwd=cfg.parent, env=agent_env())


def _delivered_once(sink: SinkServer, view: ViewServer) -> None:
    """Every version in the view was accepted, under one key each; every request carried a key."""
    accepted: dict[str, set[str]] = {}
    for key, body in sink.accepted.items():
        accepted.setdefault(body["version"], set()).add(key)
    assert set(accepted) == {r["lastSubmissionID"] for r in view.records}
    assert all(len(keys) == 1 for keys in accepted.values())
    assert all(r["headers"].get("Idempotency-Key") for r in sink.requests)


@pytest.mark.parametrize("spare", [0, 300_000], ids=["full-at-start", "full-while-admitting"])
def test_full_disk_fails_loudly_sends_nothing_unrecorded_and_resumes(tmp_path, ledger_disk, spare):
    with SinkServer(key_field="sink_id") as sink, \
            ViewServer(make_leads(20), page_size=10, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view.url, sink.url, **CALM)
        db = ledger_disk / "agent.db"
        first = _once(cfg)
        assert first.returncode == 0 and "sent: 20" in first.stdout, first.stderr

        filler = _fill(ledger_disk, spare)
        view.records.extend(_padded_leads(300, "2027-05-01T00:00:00Z"))
        sent_before = len(sink.requests)
        full = _once(cfg)
        assert full.returncode == 3, full.stdout + full.stderr
        # SQLite says "database or disk is full", or "disk I/O error" when not even its -shm file can grow
        assert ("disk is full" in full.stderr or "disk I/O error" in full.stderr) and str(db) in full.stderr
        assert "Traceback" not in full.stdout + full.stderr
        during = {r["json"]["version"] for r in sink.requests[sent_before:]}

        filler.unlink()
        assert _integrity(db) == "ok"
        assert during <= _intents(db)  # whatever went out had its intent committed first
        again = _once(cfg)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "waiting: 0" in again.stdout
        _delivered_once(sink, view)
        assert sink.replays <= len(during)


def test_full_disk_under_a_running_agent_it_says_so_stays_up_and_resumes(tmp_path, ledger_disk):
    with SinkServer(key_field="sink_id") as sink, \
            ViewServer(make_leads(20), page_size=10, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view.url, sink.url, **CALM)
        db = ledger_disk / "agent.db"
        proc, err = _popen(cfg, tmp_path, "daemon")
        try:
            assert _wait_for(lambda: len(sink.accepted) == 20, 20), err.read_text()
            filler = _fill(ledger_disk, 300_000)
            view.records.extend(_padded_leads(300, "2027-05-01T00:00:00Z"))
            assert _wait_for(lambda: "disk is full" in err.read_text(), 20), err.read_text()
            time.sleep(1)
            assert proc.poll() is None, err.read_text()  # it says so and waits; it does not exit
            filler.unlink()
            assert _wait_for(lambda: len(sink.accepted) == 320, 40), err.read_text()[-2000:]
        finally:
            code = _stop(proc, err)
        log = err.read_text()
        assert code == 0, log[-2000:]
        assert "Traceback" not in log and PASSWORD not in log
        assert _integrity(db) == "ok"
        _delivered_once(sink, view)


# -- a damaged ledger ------------------------------------------------------------------------------

def _damage(db: Path, where: str) -> None:
    data = bytearray(db.read_bytes())
    if where == "header":
        data[0:16] = b"garbage garbage!"
    else:  # an interior page of the executions table's b-tree: its cells point nowhere now
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'executions'").fetchone()[0]
        conn.close()
        start = (root - 1) * page_size
        assert data[start] == 0x05, "the executions table is too small to have an interior page"
        data[start + 12:start + page_size] = b"\xa5" * (page_size - 12)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "interior"])
def test_a_damaged_ledger_stops_the_cli_with_exit_3_and_is_never_replaced(tmp_path, where):
    with SinkServer(key_field="sink_id") as sink, \
            ViewServer(_padded_leads(300, "2027-05-01T00:00:00Z"), page_size=10, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view.url, sink.url, **CALM)
        db = tmp_path / "var" / "agent.db"
        assert _once(cfg).returncode == 0
        assert not Path(f"{db}-wal").exists()  # a clean stop checkpointed everything into the file
        _damage(db, where)
        damaged = hashlib.sha256(db.read_bytes()).hexdigest()
        inode = db.stat().st_ino
        sent = len(sink.requests)
        view.records.extend(make_leads(5, start="2027-06-01T00:00:00Z"))
        for command in (["run", "--once"], ["run"], ["status"]):
            result = subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), *command], capture_output=True,
                                    text=True, timeout=30, cwd=tmp_path, env=agent_env())
            assert result.returncode == 3, (command, result.stdout, result.stderr)
            assert "damaged" in result.stderr and str(db) in result.stderr, result.stderr
            assert "Traceback" not in result.stdout + result.stderr
            assert db.stat().st_ino == inode and hashlib.sha256(db.read_bytes()).hexdigest() == damaged
        assert len(sink.requests) == sent  # nothing sent from a ledger that cannot be trusted
