"""User errors: the one-line `PROG: error: what is wrong; what to do` and the exit codes, the
same for `dvs`, `python -m agent` and `python -m controller`.

A user error never shows a traceback: the program prints one line on stderr and exits with one
of these codes (README "Exit codes").
"""

from __future__ import annotations

import sys

EXIT_OK = 0  # done; the cluster or the run is valid
EXIT_INVALID = 1  # ran, and the answer is no: tables disagree, a move did not converge, an invariant failed
EXIT_USAGE = 2  # bad command line or input file; nothing was started
EXIT_UNKNOWN = 3  # no verdict: the chaos history is incomplete or the run broke
EXIT_ERROR = 4  # cluster or environment error: no cluster, a process that does not answer, an OS error
# 128 + N: stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) after stopping what it started.


def error_line(prog: str, message: str) -> str:
    """`prog: error: message` (message says what is wrong and what to do, in one line)."""
    return f"{prog}: error: {message}"


def fail(prog: str, message: str, code: int = EXIT_USAGE) -> int:
    """Print the error line on stderr and return the exit code to leave with."""
    print(error_line(prog, message), file=sys.stderr)
    return code
