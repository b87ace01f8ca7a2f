"""Rebuild the toy bases shipped with the package and replace them.

For each objective (``ar``, ``contextual``) the default ``pretrain-toy`` config (that
objective, everything else default) is trained from scratch (``force=true``) into a
temporary cache, evaluated, and its directory copied to ``unifyreg/toy/bases/<objective>/``
with ``shipped.json`` (the config's cache key, the training time, the host's CPU). With
``--from-cache DIR`` the bases already built in that cache for the default configs are
shipped instead of training again (an error names any that is missing). The test
``tests/test_shipped_bases.py`` fails when a shipped base's key no longer matches what its
config and world give. Usage: ``python scripts/ship_toy_bases.py [--objectives ar
contextual] [--from-cache DIR]`` (5 to 15 minutes per base on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile

from unifyreg.config import PretrainToyConfig
from unifyreg.toy.base import (
    EVAL_FILE,
    SHIPPED_DIR,
    SHIPPED_FILE,
    build_toy_base,
    cache_key,
    cache_path,
)

#: The files of a base that are shipped (the training log and checkpoints are not).
FILES = ("config.json", "model.safetensors", "tokenizer.json", "unifyreg_toy.json", EVAL_FILE,
         "pretrain.yaml")  # fmt: skip


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["ar", "contextual"])
    parser.add_argument("--from-cache", default=None, help="ship the bases built in this cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        for objective in args.objectives:
            if args.from_cache:
                built = cache_path(
                    PretrainToyConfig(objective=objective, cache_dir=args.from_cache)
                )
                missing = [name for name in FILES if not (built / name).is_file()]
                if missing:
                    raise SystemExit(f"{built} is not a complete base (missing {missing})")
            else:
                cfg = PretrainToyConfig(objective=objective, cache_dir=cache, force=True)
                built = build_toy_base(cfg)
            target = SHIPPED_DIR / objective
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for name in FILES:
                shutil.copy2(built / name, target / name)
            evaluation = json.loads((built / EVAL_FILE).read_text())
            record = {
                "cache_key": cache_key(PretrainToyConfig(objective=objective)),
                "objective": objective,
                "train_seconds": evaluation.get("train_seconds"),
                "headline": evaluation.get("headline", {}),
                "cpu": cpu_name(),
            }
            (target / SHIPPED_FILE).write_text(json.dumps(record, indent=2) + "\n")
            print(f"shipped {target}: {record['headline']}")


if __name__ == "__main__":
    main()
