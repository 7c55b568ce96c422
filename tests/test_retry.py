"""agent/retry.py: which failures are retried, how long to wait, when to give up."""
from __future__ import annotations

import pytest

from agent.config import RetryConfig
from agent.retry import RetryPolicy

T0 = 1_700_000_000.0  # the first attempt of every execution here


def never(*_):
    raise AssertionError("rand() must not be called when jitter is off or Retry-After decides")


@pytest.fixture
def policy():
    """The documented defaults, with jitter off so delays are exact."""
    return RetryPolicy(jitter=False)


# --- covers: the step's `on` list --------------------------------------------------


@pytest.mark.parametrize("condition, status, covered", [
    ("timeout", None, True),
    ("connection", None, True),
    ("5xx", 503, True),
    (None, 500, True),
    (None, 502, True),
    (None, 503, True),
    (None, 599, True),
    (None, 408, True),
    (None, 425, True),
    (None, 429, True),
    ("429", 429, True),
    (None, 404, False),
    (None, 400, False),
    (None, 401, False),
    (None, 409, False),
    (None, 302, False),
    ("auth", None, False),
    ("tls", None, False),
    ("config", None, False),
    (None, None, False),
    ("", None, False),
], ids=lambda v: repr(v))
def test_the_default_on_list_covers(condition, status, covered):
    assert RetryPolicy().covers(condition, status) is covered


@pytest.mark.parametrize("on, condition, status, covered", [
    ([503], None, 503, True),              # an integer code from TOML
    ([503], None, 502, False),
    (["503"], "5xx", 503, True),
    (["5xx"], None, 502, True),
    (["5xx"], None, 503, True),
    (["5xx"], None, 429, False),
    (["429"], None, 503, False),
    (["timeout"], "connection", None, False),
    (["timeout"], "timeout", None, True),
    ([" Timeout "], "timeout", None, True),  # the config normalises names
    ([408, "connection"], "connection", None, True),
    ([408, "connection"], None, 408, True),
], ids=lambda v: repr(v))
def test_an_on_list_from_the_config_covers(on, condition, status, covered):
    assert RetryPolicy.from_config(RetryConfig(on=on)).covers(condition, status) is covered


def test_from_config_keeps_every_setting():
    config = RetryConfig(on=["timeout", 429], attempts=3, interval="10s", backoff="fixed", max_interval="2m", window="1h", jitter=False)
    assert RetryPolicy.from_config(config) == RetryPolicy(("timeout", "429"), 3, 10.0, "fixed", 120.0, 3600.0, False)


def test_the_config_defaults_are_the_policy_defaults():
    assert RetryPolicy.from_config(RetryConfig()) == RetryPolicy()


# --- next_delay ---------------------------------------------------------------------------


@pytest.mark.parametrize("attempt, delay", [
    (1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (5, 480.0), (6, 960.0), (7, 1920.0), (8, 3600.0), (9, 3600.0), (30, 3600.0),
])
def test_exponential_delay_doubles_up_to_max_interval(policy, attempt, delay):
    assert policy.next_delay(attempt, rand=never) == delay


@pytest.mark.parametrize("attempt", [1, 2, 5, 20])
def test_fixed_delay_is_always_the_interval(attempt):
    assert RetryPolicy(backoff="fixed", interval=45.0, jitter=False).next_delay(attempt, rand=never) == 45.0


def test_fixed_delay_is_capped_by_max_interval_too():
    assert RetryPolicy(backoff="fixed", interval=600.0, max_interval=60.0, jitter=False).next_delay(3, rand=never) == 60.0


@pytest.mark.parametrize("attempt, full", [(1, 30.0), (3, 120.0), (12, 3600.0)])
def test_jitter_stays_between_half_and_the_whole_delay(attempt, full):
    policy = RetryPolicy(jitter=True)
    assert policy.next_delay(attempt, rand=lambda: 0.0) == full * 0.5
    assert policy.next_delay(attempt, rand=lambda: 1.0) == full
    assert policy.next_delay(attempt, rand=lambda: 0.5) == full * 0.75


def test_jitter_never_exceeds_max_interval():
    policy = RetryPolicy(jitter=True, max_interval=100.0)
    assert policy.next_delay(20, rand=lambda: 1.0) == 100.0


@pytest.mark.parametrize("retry_after, delay", [
    (0.0, 0.0), (5.0, 5.0), (120.0, 120.0), (3600.0, 3600.0), (86400.0, 3600.0), (-10.0, 0.0),
], ids=["zero", "short", "longer-than-backoff", "at-cap", "capped", "negative"])
def test_retry_after_is_honoured_and_capped_by_max_interval(retry_after, delay):
    policy = RetryPolicy(jitter=True)  # Retry-After is exact: no jitter on top
    assert policy.next_delay(1, retry_after=retry_after, rand=never) == delay
    assert policy.next_delay(7, retry_after=retry_after, rand=never) == delay


def test_a_very_late_attempt_still_waits_max_interval(policy):
    late = RetryPolicy(attempts=5000, window=1e9, jitter=False)
    assert late.next_delay(1100, rand=never) == 3600.0
    assert late.next_time(1100, T0, T0 + 1e6, rand=never) == T0 + 1e6 + 3600.0


# --- next_time: when to try again, or give up ---------------------------------------------


def test_next_time_is_now_plus_the_delay(policy):
    assert policy.next_time(1, T0, T0 + 2.0, rand=never) == T0 + 2.0 + 30.0
    assert policy.next_time(3, T0, T0 + 500.0, rand=never) == T0 + 500.0 + 120.0


def test_next_time_uses_jitter_and_retry_after():
    policy = RetryPolicy(jitter=True)
    assert policy.next_time(2, T0, T0, rand=lambda: 0.0) == T0 + 30.0
    assert policy.next_time(2, T0, T0, retry_after=7.0, rand=never) == T0 + 7.0


@pytest.mark.parametrize("attempt, gives_up", [(1, False), (2, False), (3, True), (4, True)])
def test_the_attempts_limit_gives_up(attempt, gives_up):
    policy = RetryPolicy(attempts=3, jitter=False)
    at = policy.next_time(attempt, T0, T0, rand=never)
    assert (at is None) is gives_up
    if not gives_up:
        assert at == T0 + 30.0 * 2 ** (attempt - 1)


def test_one_attempt_means_no_retry():
    assert RetryPolicy(attempts=1, jitter=False).next_time(1, T0, T0, rand=never) is None


@pytest.mark.parametrize("now, expected", [
    (T0 + 540.0, T0 + 600.0),   # lands exactly on the window's end: still tried
    (T0 + 541.0, None),         # would land one second past it: give up
    (T0 + 10_000.0, None),      # already past the window
], ids=["at-the-edge", "just-past", "long-past"])
def test_the_window_cuts_off_retries(now, expected):
    policy = RetryPolicy(window=600.0, backoff="fixed", interval=60.0, jitter=False)
    assert policy.next_time(2, T0, now, rand=never) == expected


def test_a_retry_after_beyond_the_window_gives_up():
    policy = RetryPolicy(window=600.0, max_interval=3600.0, jitter=False)
    assert policy.next_time(1, T0, T0 + 100.0, retry_after=400.0, rand=never) == T0 + 500.0
    assert policy.next_time(1, T0, T0 + 100.0, retry_after=501.0, rand=never) is None


def test_the_default_schedule_of_a_failing_step(policy):
    """Eight attempts at the defaults: seven waits, then give up, well inside 23h."""
    now, times = T0, []
    for attempt in range(1, 9):
        at = policy.next_time(attempt, T0, now, rand=never)
        if at is None:
            break
        times.append(at - now)
        now = at
    assert times == [30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0]
