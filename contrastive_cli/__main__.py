"""The `contrastive` console script (and `python -m contrastive_cli`).

Before the CLI's own imports (Typer, Rich: a quarter of a second), a Ctrl-C or SIGTERM already
ends the process with one line and 130/143, not a traceback; cli.main then installs the handler
that every command uses.
"""
import os
import signal
import sys


def _early_stop(signum, frame):
    os.write(2, b"error: interrupted\n" if signum == signal.SIGINT else b"error: interrupted by SIGTERM\n")
    os._exit(128 + signum)  # nothing has been written yet: no clean-up to run


def main() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _early_stop)
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    sys.exit(main())
