"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a flag, a file, a folder). Root scripts catch it and print
its message as one line on stderr with a non-zero exit and no traceback; anything else is a bug and keeps
its traceback.
"""

import argparse


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what is expected, in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `UserError` line (run_cli prints it, exit 2) instead of
    argparse's usage dump."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler), raised like Ctrl-C so that the same clean-up runs: temporary
    folders and files removed, nothing half-written left behind."""


def _terminated(signum, frame):
    raise Terminated()


def run_cli(main, argv=None) -> int:
    """Call `main(argv)` and turn a `UserError` (or Ctrl-C, or SIGTERM) into one line on stderr and exit status 2
    (130, 143)."""
    import signal
    import sys
    import threading

    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        main(argv)
    except UserError as e:
        # a path or prompt decoded with surrogateescape (non-UTF-8 bytes) shown escaped, not as a second error
        message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0
