"""`python -m testbed.chaos SCENARIO.toml --seed S --report DIR`: the same as `dvs chaos ...`."""

import sys

from testbed.cli import main

sys.exit(main(["chaos", *sys.argv[1:]]))
