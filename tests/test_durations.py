"""Every duration in agent.toml has bounds: a value outside them is a config error (exit 2), never a spin or a traceback."""
from __future__ import annotations


import pytest

from agent.config import load

CONFIG = '''
[agent]
ledger = "var/agent.db"
{agent}

[sources.leads]
kind = "rest"
url = "http://127.0.0.1:9/api/views/Leads/All"
id = "lastSubmissionID"
{source}

[sources.backlog]
kind = "file"
path = "leads.json"
id = "lastSubmissionID"
{file}

[connectors.crm]
kind = "http"
base_url = "http://127.0.0.1:9/api"
{http}
[connectors.crm.objects.leads]
path = "/leads"
key = "email"

[connectors.mail]
kind = "smtp"
host = "127.0.0.1"
sender = "agent@example.invalid"
{smtp}

[[flows]]
name = "leads-to-crm"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "crm > leads > create"
  [flows.steps.retry]
  {retry}
'''

SECTIONS = {"agent": "agent", "sources.leads": "source", "sources.backlog": "file", "connectors.crm": "http",
            "connectors.mail": "smtp", "flows[0].steps[0].retry": "retry"}

# where the key lives, the key, and the range the message must name
RANGES = {
    "every": ("sources.leads", "every", "between 1s and 30d"),
    "file every": ("sources.backlog", "every", "between 1s and 30d"),
    "source timeout": ("sources.leads", "timeout", "between 100ms and 1h"),
    "http timeout": ("connectors.crm", "timeout", "between 100ms and 1h"),
    "smtp timeout": ("connectors.mail", "timeout", "between 100ms and 1h"),
    "overlap": ("sources.leads", "overlap", "between 0s and 30d"),
    "window": ("sources.leads", "window", "between 1m and 3650d"),
    "retention": ("agent", "retention", "between 0s and 3650d"),
    "lease": ("agent", "lease", "between 1s and 1d"),
    "retry interval": ("flows[0].steps[0].retry", "interval", "between 0s and 1d"),
    "retry max_interval": ("flows[0].steps[0].retry", "max_interval", "between 0s and 30d"),
    "retry window": ("flows[0].steps[0].retry", "window", "between 0s and 30d"),
}

# TOML values no duration accepts: spin the scheduler, crash the date arithmetic, or mean nothing
HOSTILE = ["-1", '"-1s"', "inf", "-inf", "nan", "1e300", "1e308", '"99999999999999999999d"', "true"]
# values that are fine somewhere but not for this key
TOO_SMALL = {"every": ["0", '"0s"', '"0.0000001s"', '"999ms"', "0.5"], "file every": ['"0s"'],
             "source timeout": ["0", '"0s"', '"0.05s"'], "http timeout": ["0", '"50ms"'], "smtp timeout": ["0"],
             "window": ['"0s"', '"59s"'], "lease": ["0"]}
TOO_BIG = {"every": ['"31d"'], "source timeout": ['"2h"', "3601"], "http timeout": ['"61m"'], "smtp timeout": ['"1d"'],
           "overlap": ['"31d"'], "retry interval": ['"2d"']}

CASES = [pytest.param(case, value, id=f"{case}={value}")
         for case in RANGES for value in HOSTILE + TOO_SMALL.get(case, []) + TOO_BIG.get(case, [])]


def config_text(section: str = "", line: str = "") -> str:
    """The config with `line` added to `section` (a key of SECTIONS)."""
    slots = {slot: "" for slot in SECTIONS.values()}
    if section == "agent":  # a lease is at least twice the longest connector timeout: short ones make room for its bounds
        slots["http"] = slots["smtp"] = 'timeout = "100ms"'
    if section:
        slots[SECTIONS[section]] = line
    return CONFIG.format(**slots)


@pytest.mark.parametrize("case, value", CASES)
def test_a_duration_out_of_bounds_is_a_config_error(tmp_path, cli, case, value):
    section, key, allowed = RANGES[case]
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(section, f"{key} = {value}"))
    status, out, err = cli("--config", str(cfg), "validate", "--offline")
    assert status == 2, out + err
    assert out == ""
    assert err.startswith(f"{cfg}: {section}.{key}: "), err
    assert allowed in err or "is not a duration" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("case", ["every", "source timeout", "retention"])
def test_agent_run_refuses_an_unbounded_duration_before_touching_anything(tmp_path, cli, case):
    section, key, allowed = RANGES[case]
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text(section, f"{key} = nan"))
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 2
    assert err == f"{cfg}: {section}.{key}: nan: must be {allowed}\n"
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("case", RANGES)
def test_the_bounds_themselves_are_allowed(tmp_path, case):
    section, key, allowed = RANGES[case]
    low, high = allowed.removeprefix("between ").split(" and ")
    for value in (low, high):
        cfg = tmp_path / "agent.toml"
        cfg.write_text(config_text(section, f'{key} = "{value}"'))
        config = load(cfg)
        assert config.path == cfg.resolve()


def test_a_number_is_seconds_and_units_convert(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text("sources.leads", 'every = 90\ntimeout = "250ms"\noverlap = "1.5m"\nwindow = "7d"'))
    leads = load(cfg).sources["leads"]
    assert (leads.every, leads.timeout, leads.overlap, leads.window) == (90.0, 0.25, 90.0, 7 * 86400.0)


def test_a_boolean_is_not_a_duration(tmp_path, cli):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text("sources.leads", "every = true"))
    status, _, err = cli("--config", str(cfg), "validate", "--offline")
    assert status == 2
    assert err == f"{cfg}: sources.leads.every: True is not a duration; write a number and a unit: '30s', '5m', '1h', '1d'\n"


def test_a_lease_shorter_than_twice_a_connector_timeout_is_a_config_error(tmp_path, cli):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(CONFIG.format(agent='lease = "50s"', source="", file="", http='timeout = "30s"', smtp='timeout = "10s"', retry=""))
    status, out, err = cli("--config", str(cfg), "validate", "--offline")
    assert status == 2
    assert err == (f"{cfg}: agent.lease: 50s is shorter than twice the longest connector timeout (connectors.crm.timeout = 30s); "
                   "make the lease at least 60s or the timeout shorter\n")


def test_an_unset_lease_grows_to_twice_the_longest_connector_timeout(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(CONFIG.format(agent="", source="", file="", http='timeout = "1h"', smtp="", retry=""))
    assert load(cfg).agent.lease == 7200.0
    cfg.write_text(CONFIG.format(agent="", source="", file="", http="", smtp="", retry=""))
    assert load(cfg).agent.lease == 300.0  # the default, more than twice the default timeouts
