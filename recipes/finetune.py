"""Entry point: `python recipes/finetune.py [--config FILE] [key=value ...]`.

Same as `unifyreg finetune ...`; the recipe itself, readable top to bottom, is
unifyreg/recipes/finetune.py.
"""

import sys

from unifyreg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["finetune", *sys.argv[1:]]))
