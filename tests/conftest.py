import os
import signal
import sys
from pathlib import Path
from typing import Callable

import pytest
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown (and unused) when it is not loaded
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: two workers a core. Most tests wait on sockets, subprocesses and servers, not on the CPU:
    on 2 cores, 4 workers finish the suite in about 100 s where 2 take about 120 s."""
    return 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# -- the order the tests start in under `-n`: the slowest first, spread over the workers -------------------------
# Seconds each of the slowest tests takes in a full `-n auto` run on 2 cores (`--durations=40`). Started last,
# one of them alone would make the run wait for it while the other workers sit idle; started first, on workers
# of their own, they run while the short tests fill the gaps. A test not listed keeps its place after them; a
# listed name no longer collected is ignored; a name without its [parameters] stands for each of its cases.
SLOW = {
    "tests/test_fault_storm.py::test_kill_storm": 33,
    "tests/test_pg_storm.py::test_kill_storm_on_postgresql": 11,
    "tests/test_fault_storm.py::test_full_disk_under_a_running_agent_it_says_so_stays_up_and_resumes": 7,
    "tests/test_run_daemon.py::test_a_stop_with_a_call_stuck_ends_within_the_grace_and_the_next_start_recovers_it": 7,
    "tests/test_pg_storm.py::test_the_storm_catches_an_unfenced_outcome_and_a_resend": 6.5,
    "tests/test_fault_storm.py::test_the_storm_catches_a_planted_bug": 5.5,
    "tests/test_pg_storm.py::test_a_poller_frozen_past_its_lease_writes_nothing_more_for_its_source": 5.5,
    "tests/test_postgres_ledger.py::test_the_claim_walks_the_partial_indexes_not_the_finished_rows": 5,
    "tests/test_endpoint.py::test_health_turns_503_after_three_failed_intervals_with_the_reasons_of_status_and_200_once_the_view_recovers": 4.5,
    "tests/test_cli_integration.py::test_thousand_records_are_sent_once_then_never_again": 4.5,
    "tests/test_fault_storm.py::test_two_agents_started_at_once_one_runs_the_other_exits_3": 4.5,
    "tests/test_poller.py::test_iso_utc_text_of_one_shape_sorts_as_its_time_so_a_lower_one_is_not_parsed": 3,
    "tests/test_fault_storm.py::test_a_damaged_ledger_stops_the_cli_with_exit_3_and_is_never_replaced": 3,
    "tests/test_cli_integration.py::test_sink_5xx_is_retried_by_policy_with_the_same_key": 2.5,
    "tests/test_cli_operations.py::test_an_operator_finds_reads_and_requeues_a_dead_execution": 2.5,
    "tests/test_run_daemon.py::test_run_polls_on_schedule_delivers_and_stops_cleanly_on_sigterm": 2.5,
    "tests/test_flow_chaining.py::test_a_crash_between_the_upstream_success_and_the_chained_run_neither_loses_nor_doubles_it": 2,
    "tests/test_run_daemon.py::test_sighup_during_a_slow_delivery_finishes_the_step_and_exits_0": 2,
    "tests/test_run_daemon.py::test_sigterm_during_a_slow_delivery_finishes_the_step": 2,
    "tests/test_fault_storm.py::test_full_disk_fails_loudly_sends_nothing_unrecorded_and_resumes": 2,
    "tests/test_cli_operations.py::test_replay_sends_again_under_new_keys_after_confirmation": 2,
    "tests/test_smtp_hostile.py::test_the_deadline_is_per_message_not_per_connection": 2,
}


def expected_seconds(nodeid: str) -> float:
    return SLOW.get(nodeid, SLOW.get(nodeid.split("[", 1)[0], 0))


def start_order(nodeids: list[str], workers: int, seconds: Callable[[str], float] = expected_seconds) -> list[int]:
    """Positions of `nodeids` in the order to run them: the slow ones first (`seconds` > 0), so that each of `workers`
    starts one of the slowest and takes one of the next as its second (xdist hands a worker two at first, then one
    at a time, see pytest_configure): the longest with the shortest of those, and so on; the rest of the list after."""
    slow = sorted((i for i, nodeid in enumerate(nodeids) if seconds(nodeid)), key=lambda i: -seconds(nodeids[i]))
    chosen = set(slow)
    rest = [i for i in range(len(nodeids)) if i not in chosen]
    first, second = slow[:workers], slow[workers:2 * workers][::-1]
    second += rest[:len(first) - len(second)]  # a worker with no second slow test takes the first of the others
    rest = rest[max(0, len(first) - len(slow[workers:2 * workers])):]
    order = [i for pair in zip(first, second) for i in pair] + first[len(second):]
    return order + slow[2 * workers:] + rest


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # the same in every worker: they must agree
    order = start_order([item.nodeid for item in items], workers)
    items[:] = [items[i] for i in order]


def pytest_configure(config):
    """Under `-n`, hand out the tests one at a time (two at first), not in chunks of a quarter of a worker's share:
    the slow tests at the head of the order then go one to each worker instead of all to the first."""
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1


@pytest.fixture
def caplog(caplog):
    """Let pytest's caplog see loguru records (loguru's documented recipe)."""
    handler_id = logger.add(caplog.handler, format="{message}", level=0, filter=lambda record: record["level"].no >= caplog.handler.level, enqueue=False)
    yield caplog
    logger.remove(handler_id)


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Tests that call the CLI in-process install the agent's stop handlers: put the previous ones back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def cli(capfd):
    """Run `agent ...` in this process; give back (exit status, stdout, stderr); its logging is undone after."""
    from agent.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        out, err = capfd.readouterr()
        return status, out, err

    yield run
    logger.remove()  # main() routed loguru to this test's captured stderr, which is closed after the test
    logger.add(sys.stderr)


# -- a real PostgreSQL (tests/pgserver.py): one server per test process, one database per test ----------------
@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for this test process (each xdist worker starts its own); stopped at the end.

    When it cannot be started, every test that needs it fails with the reason (never skips)."""
    from pgserver import PgServer, PgServerError

    try:
        server = PgServer.start()
    except PgServerError as error:
        pytest.fail(f"PostgreSQL could not be started: {error}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh, empty database (copied from the server's template), dropped after the test."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)
