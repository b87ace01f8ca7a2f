"""Entry point: `python recipes/pretrain_toy.py [--config FILE] [key=value ...]`.

Same as `unifyreg pretrain-toy ...`; the recipe itself, readable top to bottom, is
unifyreg/recipes/pretrain_toy.py.
"""

import sys

from unifyreg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrain-toy", *sys.argv[1:]]))
