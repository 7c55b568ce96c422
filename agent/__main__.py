"""``python -m agent`` and the ``agent`` command.

Stop signals are caught first thing, before any heavy import: until `run` and
`poll` put in the agent's own handlers (which finish the steps in flight), a
SIGTERM, SIGINT or SIGHUP ends the command at once, with exit status 0.
Output into a pipe whose reader has gone (``agent executions | head``) ends
quietly too.

The cyclic garbage collector is off while the command starts: imports and the
config build many objects that live as long as the process, and collecting
among them found next to nothing (some hundred objects) but cost about 8 ms of
`agent status` (a health check that runs every minute). The CLI turns it back on, with those objects frozen,
before the command's own work (``agent.cli.main``). At the end they are frozen
again, so the interpreter's exit does not walk them all once more (about 20 ms).
"""
import gc
import os
import signal
import sys

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_now(signum, frame):
    """A stop before the agent's own handlers are in: end the process here, with exit status 0.

    Not by raising an exception: the handler runs wherever the main thread happens to be, and code there may
    swallow it (a ``__del__``, a callback from a compiled library such as pydantic-core, which turns it into an
    error of its own), leaving a command that ignores its stop. Nothing needs finishing yet: no step has been
    claimed, and a ledger write cut here is rolled back, as after a crash."""
    os._exit(0)


def _ignore_stops() -> None:
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN)


def run() -> int:
    """The CLI's exit status; the CLI is imported in here, so a stop during its imports is caught too."""
    gc.disable()  # see the module docstring; the CLI enables it again
    for signum in STOPS:
        signal.signal(signum, _stop_now)
    try:
        return _run()
    finally:
        _ignore_stops()  # the command has ended: a late stop changes nothing, and must not print a traceback
        gc.freeze()  # everything left is freed by the exit itself: no last collection over it


def _run() -> int:
    from agent.cli import main

    try:
        status = main()
    except BrokenPipeError:  # the reader has all it wanted (`| head`): the rest of the listing goes nowhere
        _discard_stdout()
        return 0
    try:
        sys.stdout.flush()  # here, not at the interpreter's exit, where a closed pipe can only be complained about
    except BrokenPipeError:
        _discard_stdout()
    return status


def _discard_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered must not fail again when the interpreter exits."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(run())
