"""Entry point: `python recipes/eval.py [--config FILE] [key=value ...]`.

Same as `unifyreg eval ...`; the recipe itself, readable top to bottom, is
unifyreg/recipes/evaluate.py.
"""

import sys

from unifyreg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
