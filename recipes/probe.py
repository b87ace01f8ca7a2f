"""Entry point: `python recipes/probe.py [--config FILE] [key=value ...]`.

Same as `unifyreg probe ...`; the recipe itself, readable top to bottom, is
unifyreg/recipes/probe.py.
"""

import sys

from unifyreg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["probe", *sys.argv[1:]]))
