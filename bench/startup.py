"""Start-up time of the `agent` command against `python -c pass` (the interpreter's own start).

    .venv/bin/python bench/startup.py              # 10 runs of each, medians
    .venv/bin/python bench/startup.py --repeats 20

Each command runs as a fresh process, the way an operator or a health check
starts it: `agent --help`, `agent --version` and `agent status` twice: on the
repository's own sample config (a file source; file and mailbox connectors),
and on a real one (a `rest` source, an `http` and an `smtp` connector), each
in a scratch folder and run once so a ledger exists. The real config's view is
served on 127.0.0.1 for that one run and stopped before anything is timed:
`status` reads the ledger and needs no network. The target (issue 11) is
within 0.15 s of `python -c pass`.

The figure is a warm start, as an installed agent gets it: the project's
packages are compiled to bytecode once (compileall) before anything is timed,
and the commands run with PYTHONDONTWRITEBYTECODE removed from their
environment. With it set (some shells and container images set it), every
start would compile the project's modules from source again (about 35 ms),
which measures the shell, not the agent; the image compiles them when it is
built (see the Dockerfile).

The commands run in turns (bare, --help, --version, status, bare, ...), so a
busy moment of a shared machine weighs on all of them alike; beside each wall
time the table gives the CPU time the process used, which waits for no one.
"""
from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common import ROOT, scratch, served
from fileconfig import REST_HTTP_SMTP  # the config tests/test_cli_fast.py checks status's imports on

TARGET = 0.15  # seconds over `python -c pass`
AGENT = Path(sys.executable).with_name("agent")  # the installed console script beside this python
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def _compile_project() -> None:
    """Bytecode for every package the project installs, written beside the sources as an import would write it."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        if not compileall.compile_dir(ROOT / package, quiet=1):
            sys.exit(f"cannot compile {ROOT / package}")


def _once(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one run: the time it took, and the CPU time the process used (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _medians(commands: list[list[str]], cwd: Path, repeats: int) -> list[tuple[float, float]]:
    """(wall, cpu) medians of each command, run in turns: a busy moment of the machine weighs on all of them alike."""
    for argv in commands:
        _once(argv, cwd)  # warm the file cache: the figure is the start, not the first read from disk
    runs = [[_once(argv, cwd) for argv in commands] for _ in range(repeats)]
    return [(statistics.median(run[i][0] for run in runs), statistics.median(run[i][1] for run in runs))
            for i in range(len(commands))]


def _prepare(folder: Path) -> None:
    """The sample config and its view in a scratch folder, with a ledger: what `status` reads."""
    shutil.copy(ROOT / "agent.toml", folder / "agent.toml")
    (folder / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "leads.json", folder / "examples" / "leads.json")
    subprocess.run([str(AGENT), "run", "--once"], cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def _prepare_real(folder: Path) -> None:
    """A rest -> http + smtp config with a ledger primed from a local view, which is stopped afterwards."""
    folder.mkdir()
    with served("view", 250) as view:
        (folder / "agent.toml").write_text(REST_HTTP_SMTP.format(view=view))
        subprocess.run([str(AGENT), "run", "--once"], cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)  # first_run = "skip": the view's leads are primed, nothing goes to the sinks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not AGENT.exists():
        sys.exit(f"no `agent` command beside {sys.executable}: install the project first (pip install -e .)")
    _compile_project()
    with scratch() as folder:
        _prepare(folder)
        _prepare_real(folder / "real")
        real = ["--config", "real/agent.toml"]
        commands = [("--help", ["--help"]), ("--version", ["--version"]), ("status (sample)", ["status"]),
                    ("status (rest, http, smtp)", [*real, "status"])]
        (bare, bare_cpu), *measured = _medians([[sys.executable, "-c", "pass"]] + [[str(AGENT), *argv] for _, argv in commands],
                                               folder, args.repeats)
        print(f"python -c pass: {bare * 1000:.0f} ms, cpu {bare_cpu * 1000:.0f} ms (medians of {args.repeats}); "
              f"target: within {TARGET * 1000:.0f} ms of it")
        print(f"{'command':<31} {'median':>8} {'over bare':>10} {'ratio':>7} {'cpu':>7}  within target")
        for (name, _), (took, cpu) in zip(commands, measured):
            print(f"{'agent ' + name:<31} {took * 1000:>6.0f}ms {(took - bare) * 1000:>8.0f}ms {took / bare:>6.1f}x "
                  f"{cpu * 1000:>5.0f}ms  {'yes' if took - bare <= TARGET else 'NO'}")


if __name__ == "__main__":
    main()
