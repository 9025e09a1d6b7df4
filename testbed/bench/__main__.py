"""`python -m testbed.bench ...`: the same as `dvs bench ...`."""

from __future__ import annotations

import sys

from testbed.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
