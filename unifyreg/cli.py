"""Command line: ``unifyreg <command> [--config FILE] [key=value ...]``.

Each command has a structured config (``unifyreg.config``): defaults, then the YAML file,
then the ``key=value`` overrides. A config error stops the command before any work with
exit code 2 and a message naming the key and the valid choices; so does a bad manifest
line (``on_bad_example=error``), with a message naming the file and line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from unifyreg.config import (
    AblateConfig,
    ConfigError,
    EvalConfig,
    FinetuneConfig,
    PretrainToyConfig,
    ProbeRunConfig,
    load_config,
)
from unifyreg.manifest import ManifestError

__all__ = ["COMMANDS", "main"]


def _pretrain_toy(cfg: Any) -> int:
    from unifyreg.recipes.pretrain_toy import run

    return run(cfg)


def _evaluate(cfg: Any) -> int:
    from unifyreg.recipes.evaluate import run

    return run(cfg)


def _probe(cfg: Any) -> int:
    from unifyreg.recipes.probe import run

    return run(cfg)


def _finetune(cfg: Any) -> int:
    from unifyreg.recipes.finetune import run

    return run(cfg)


def _ablate(cfg: Any) -> int:
    from unifyreg.recipes.ablate import run

    return run(cfg)


#: command -> (config schema, runner, one-line help)
COMMANDS: dict[str, tuple[type, Callable[[Any], int], str]] = {
    "pretrain-toy": (PretrainToyConfig, _pretrain_toy, "train (or reuse) the cached toy base"),
    "eval": (EvalConfig, _evaluate, "exact-match accuracy of a toy model per task/category"),
    "probe": (ProbeRunConfig, _probe, "run the two-level entropy probe; write tables, figures"),
    "finetune": (FinetuneConfig, _finetune, "fine-tune (LoRA) with per-epoch entropy probes"),
    "ablate": (AblateConfig, _ablate, "ablate the regularizer: arms x seeds, report + figures"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifyreg",
        description="Entropy probes and a contextual-prediction regularizer for UMMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, _, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", "-c", help="YAML config file (defaults if omitted)")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unifyreg`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    schema, runner, _ = COMMANDS[args.command]
    try:
        cfg = load_config(schema, args.config, args.overrides)
        return runner(cfg)
    except ConfigError as error:
        print(f"unifyreg {args.command}: config error: {error}", file=sys.stderr)
        return 2
    except ManifestError as error:
        print(f"unifyreg {args.command}: bad example: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
