"""What every `dvs` command shares about output: results on stdout, progress and errors on
stderr, nothing cut short in a pipe, and exit codes with one meaning each."""

from __future__ import annotations

from rich.console import Console

# Exit codes of every `dvs` command (README "Exit codes", `dvs --help`): dvswitch/errors.py.
from dvswitch.errors import EXIT_ERROR, EXIT_INVALID, EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE  # noqa: F401

# In a pipe or a file, tables are as wide as their content: rich would cut them to 80 columns.
PIPE_WIDTH = 100_000


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console that never truncates when its stream is not a terminal."""
    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=PIPE_WIDTH)
    return c
