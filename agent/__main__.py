"""``python -m agent`` and the ``agent`` command: the CLI; Ctrl-C while it is still starting ends it quietly (exit 130)."""
import sys


def run() -> int:
    """The CLI's exit status; the CLI is imported in here, so a Ctrl-C during its imports is caught too."""
    try:
        from agent.cli import main
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
