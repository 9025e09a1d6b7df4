"""What every `dvs` command shares about output: results on stdout, progress and errors on
stderr, nothing cut short in a pipe, and exit codes with one meaning each."""

from __future__ import annotations

from rich.console import Console

# Exit codes of every `dvs` command (README "Exit codes", `dvs --help`).
EXIT_OK = 0  # done; the cluster or the run is valid
EXIT_INVALID = 1  # ran, and the answer is no: tables disagree, a move did not converge, an invariant failed
EXIT_USAGE = 2  # bad command line or input file; nothing was started
EXIT_UNKNOWN = 3  # no verdict: the chaos history is incomplete or the run broke
EXIT_ERROR = 4  # cluster or environment error: no cluster, a process that does not answer, an OS error
# 128 + N: stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) after stopping what it started.

# In a pipe or a file, tables are as wide as their content: rich would cut them to 80 columns.
PIPE_WIDTH = 100_000


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console that never truncates when its stream is not a terminal."""
    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=PIPE_WIDTH)
    return c
