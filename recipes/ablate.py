"""Entry point: `python recipes/ablate.py [--config FILE] [key=value ...]`.

Same as `unifyreg ablate ...`; the recipe itself, readable top to bottom, is
unifyreg/recipes/ablate.py.
"""

import sys

from unifyreg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["ablate", *sys.argv[1:]]))
