"""User-facing errors: bad input ends a command with exit code 2 and one line naming the file.

Every CLI wraps its `main` with `run_cli`, so a user error never shows a traceback, while a bug
(any other exception) still does. The exit codes every command documents (`EXIT_CODES`): 0 done,
1 failed (a bug's traceback, or a run that did not finish, e.g. a search with unfinished trials),
2 bad input (one line naming the file or flag), 130 interrupted by Ctrl-C (128 + SIGINT, as a
shell reports it). The one line is masked (`redact.mask_text`): an error that names a database
or tracking URL never prints its password.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from geopose_ray.redact import mask_text

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = "exit codes: 0 done, 1 failed, 2 bad input (one line naming the file or flag), 130 interrupted (Ctrl-C)"


class InputError(Exception):
    """A missing, unreadable or malformed input file (or folder)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable, so it crosses Ray task / actor boundaries intact
        return (InputError, (self.path, self.problem))


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)` and exit with its code; InputError -> one line on stderr, exit 2;
    Ctrl-C (KeyboardInterrupt) -> one line, exit 130 instead of a traceback."""
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {mask_text(str(e))}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or EXIT_OK)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` for the commands: the module docstring as written (its usage examples keep their
    lines), and every option's default unless its help already says it or there is none (0 and
    0.0 are defaults to show: only None, False, [] and SUPPRESS mean none, compared by identity
    since `0 == False`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        none = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in text or none or not action.option_strings:
            return text
        return f"{text} (default: {default})"
