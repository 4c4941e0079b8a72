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


# The stop signal received by this process's run_cli, if any (Terminated or KeyboardInterrupt). C code can swallow
# the exception a signal handler raises: numpy's array coercion clears it (seen in `rng.choice` of a list of
# strings, about 1 SIGTERM in 25 in the shapes generator), and the loop then runs to its end as if never told to
# stop. Long loops call `raise_if_stopped()` once an item, so the stop is raised again from plain Python code.
_stop: type[KeyboardInterrupt] | None = None


def _stopped(signum, frame):
    """SIGTERM raises Terminated, SIGINT KeyboardInterrupt (as Python's own handler), each recorded in _stop."""
    import signal

    global _stop
    _stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    raise _stop()


def raise_if_stopped() -> None:
    """Raise the stop (SIGTERM or Ctrl-C) this process received again, if one came and was swallowed. Call it in
    a long loop's body only, never in clean-up code."""
    if _stop is not None:
        raise _stop()


def run_cli(main, argv=None) -> int:
    """Call `main(argv)` and turn a `UserError` (or Ctrl-C, or SIGTERM) into one line on stderr and exit status 2
    (130, 143)."""
    import signal
    import sys
    import threading

    global _stop
    _stop = None
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _stopped) if in_main else None
    # Ctrl-C as Python's own handler does (KeyboardInterrupt), recorded for raise_if_stopped; a SIGINT that this
    # process was started ignoring (nohup, `cmd &` in a script) stays ignored
    previous_int = signal.getsignal(signal.SIGINT) if in_main else None
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stopped)
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
        _stop = None  # handled here: a later main() called in this process (tests, notebooks) starts unstopped
        if in_main:
            signal.signal(signal.SIGTERM, previous)
            if previous_int is signal.default_int_handler:
                signal.signal(signal.SIGINT, previous_int)
    return 0
