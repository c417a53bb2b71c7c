"""User-facing errors: bad input ends a command with exit code 2 and one line naming the file.

Every CLI wraps its `main` with `run_cli`, so a user error never shows a traceback, while a bug
(any other exception) still does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """A missing, unreadable or malformed input file (or folder)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable, so it crosses Ray task / actor boundaries intact
        return (InputError, (self.path, self.problem))


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)` and exit with its code; InputError -> one line on stderr, exit 2."""
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code or 0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` for the commands: the module docstring as written (its usage examples keep their
    lines), and every option's default unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {default})"
