"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a flag, a file, a folder). Root scripts catch it and print
its message as one line on stderr with a non-zero exit and no traceback; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what is expected, in one line."""


def run_cli(main, argv=None) -> int:
    """Call `main(argv)` and turn a `UserError` (or Ctrl-C) into one line on stderr and exit status 2 (130)."""
    import sys

    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
