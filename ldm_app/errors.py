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


def run_cli(main, argv=None) -> int:
    """Call `main(argv)` and turn a `UserError` (or Ctrl-C) into one line on stderr and exit status 2 (130)."""
    import sys

    try:
        main(argv)
    except UserError as e:
        # a path or prompt decoded with surrogateescape (non-UTF-8 bytes) shown escaped, not as a second error
        message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
