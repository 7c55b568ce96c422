"""The Dockerfile and the systemd unit say what the README says (no image can be built here: there is no Docker engine)."""
from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest

import sinks
import sources
from agent.process import STOP_GRACE

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def argv(arguments: str) -> list[str]:
    """An instruction's command: the exec form (a JSON list) or the shell form."""
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def readme() -> str:
    return (ROOT / "README.md").read_text()


def readme_install() -> str:
    """The install command of the README's "Try it": its first line up to the command that runs the agent."""
    block = re.search(r"## Try it.*?```sh\n(.*?)```", readme(), re.S).group(1)
    return block.strip().split(" && .venv/bin/agent")[0]


def test_the_image_installs_as_the_readme_says_on_a_slim_python_3_11():
    steps = dockerfile()
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.11-slim(-\w+)?", steps[0][1])
    install = readme_install()
    assert install == "python3 -m venv .venv && .venv/bin/pip install -q -e ."
    assert ("RUN", install) in steps


def test_the_image_runs_the_readme_s_agent_run():
    steps = dockerfile()
    [cmd] = [argv(arguments) for instruction, arguments in steps if instruction == "CMD"]
    commands = re.search(r"## Commands\n+```\n(.*?)```", readme(), re.S).group(1)
    documented = [line.split("  ")[0].strip() for line in commands.splitlines()]
    assert " ".join(cmd) == "agent run" and "agent run" in documented
    assert not any(instruction == "ENTRYPOINT" for instruction, _ in steps)  # `docker run IMAGE agent status` works
    assert ("STOPSIGNAL", "SIGTERM") in steps


def test_the_image_runs_as_a_user_that_is_not_root_and_keeps_config_and_ledger_on_a_volume():
    steps = dockerfile()
    users = [arguments for instruction, arguments in steps if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, (instruction, _) in enumerate(steps) if instruction == "USER")
    assert all(instruction != "CMD" or i > last_user for i, (instruction, _) in enumerate(steps))
    env = " ".join(arguments for instruction, arguments in steps if instruction == "ENV")
    config = re.search(r"AGENT_CONFIG=(\S+)", env).group(1)
    volumes = [v for instruction, arguments in steps if instruction == "VOLUME" for v in argv(arguments)]
    assert any(Path(config).is_relative_to(volume) for volume in volumes)  # the ledger's relative path follows the config


def test_the_health_check_runs_agent_status():
    [check] = [arguments for instruction, arguments in dockerfile() if instruction == "HEALTHCHECK"]
    options, _, command = check.partition("CMD")
    assert argv(command.strip()) == ["agent", "status"]


def test_the_build_context_leaves_out_ledgers_outboxes_secrets_and_the_venv():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var", "*.db", ".env"} <= ignored
    copied = {argv(arguments)[0] if arguments.startswith("[") else arguments.split()[0]
              for instruction, arguments in dockerfile() if instruction == "COPY"}
    assert not any(path.rstrip("/") in ignored for path in copied)  # everything the image copies is in the context


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((ROOT / "examples" / "sync-agent.service").read_text())
    return parser


def seconds(value: str) -> float:
    """A systemd time span ("60", "60s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    return sum(float(number) * units[unit] for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value))


def slowest_default_timeout() -> float:
    """The longest default `timeout` of every source and connector kind."""
    kinds = [sources.source_class(kind) for kind in sources.KINDS] + [sinks.connector_class(kind) for kind in sinks.KINDS]
    return max(field.default for cls in kinds if (field := cls.Config.model_fields.get("timeout")) is not None)


def test_the_service_restarts_on_failure_and_waits_out_a_stop():
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert seconds(service["TimeoutStopSec"]) > slowest_default_timeout() + STOP_GRACE
    program, *arguments = shlex.split(service["ExecStart"])
    assert Path(program).is_absolute() and [Path(program).name, *arguments] == ["agent", "run"]  # systemd wants a full path
    assert service.get("User") not in (None, "root")


@pytest.mark.parametrize("value, expected", [("60", 60), ("60s", 60), ("1min 30s", 90), ("2min", 120)])
def test_systemd_time_spans_are_read_as_systemd_reads_them(value, expected):
    assert seconds(value) == expected


def test_the_image_copies_every_package_the_project_installs():
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {arguments.split()[0] for instruction, arguments in dockerfile() if instruction == "COPY"}
    assert set(packages) <= copied, set(packages) - copied


def test_the_image_compiles_every_package_it_copies_to_bytecode_before_it_drops_root():
    """PYTHONDONTWRITEBYTECODE keeps bytecode from being written at run time: built into the image, it spares every
    `agent status` of the health check the compiling of the agent's modules from source."""
    import tomllib

    steps = dockerfile()
    env = " ".join(arguments for instruction, arguments in steps if instruction == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    compiles = [(i, argv(arguments)) for i, (instruction, arguments) in enumerate(steps)
                if instruction == "RUN" and "compileall" in arguments]
    assert compiles, "no RUN … -m compileall"
    [(at, words)] = compiles
    command = words[words.index("compileall") + 1:]
    command = command[:next((i for i, word in enumerate(command) if word in ("&&", ";")), len(command))]
    assert set(packages) <= {word.rstrip("/") for word in command if not word.startswith("-")}, command
    copied_at = [i for i, (instruction, arguments) in enumerate(steps) if instruction == "COPY" and arguments.split()[0] in packages]
    first_user = min(i for i, (instruction, _) in enumerate(steps) if instruction == "USER")
    assert max(copied_at) < at < first_user  # after the sources are in, while root may still write __pycache__
