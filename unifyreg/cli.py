"""Command line: ``unifyreg <command> [--config FILE] [options] [key=value ...]``.

Each command has a structured config (``unifyreg.config``): defaults, then the YAML file,
then the ``key=value`` overrides. A config error stops the command before any work with
exit code 2 and a message naming the key and the valid choices; so does a bad manifest
line (``on_bad_example=error``), with a message naming the file and line. A full disk
(``ENOSPC``, ``EDQUOT``) stops it with exit code 1 and one line naming the file that could
not be written.
``--print-config`` prints the resolved config as YAML and exits; ``--dry-run`` runs the
command's own checks (files, model directory, layers, Trainer settings) and stops before
the first forward pass.
"""

from __future__ import annotations

import argparse
import errno
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
    to_yaml,
)
from unifyreg.manifest import ManifestError

__all__ = ["COMMANDS", "DISK_FULL", "main"]

#: Errors that mean the disk (or the quota) is full: reported in one line, exit code 1.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _pretrain_toy(cfg: Any, dry_run: bool = False) -> int:
    from unifyreg.recipes.pretrain_toy import run

    return run(cfg, dry_run=dry_run)


def _evaluate(cfg: Any, dry_run: bool = False) -> int:
    from unifyreg.recipes.evaluate import run

    return run(cfg, dry_run=dry_run)


def _probe(cfg: Any, dry_run: bool = False) -> int:
    from unifyreg.recipes.probe import run

    return run(cfg, dry_run=dry_run)


def _finetune(cfg: Any, dry_run: bool = False) -> int:
    from unifyreg.recipes.finetune import run

    return run(cfg, dry_run=dry_run)


def _ablate(cfg: Any, dry_run: bool = False) -> int:
    from unifyreg.recipes.ablate import run

    return run(cfg, dry_run=dry_run)


#: command -> (config schema, runner, one-line help)
COMMANDS: dict[str, tuple[type, Callable[..., int], str]] = {
    "pretrain-toy": (PretrainToyConfig, _pretrain_toy, "train (or reuse) the cached toy base"),
    "eval": (EvalConfig, _evaluate, "exact-match accuracy of a toy model per task/category"),
    "probe": (ProbeRunConfig, _probe, "run the two-level entropy probe; write tables, figures"),
    "finetune": (FinetuneConfig, _finetune, "fine-tune (LoRA) with per-epoch entropy probes"),
    "ablate": (AblateConfig, _ablate, "ablate the regularizer: arms x seeds, report + figures"),
}


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per :data:`COMMANDS` entry, each taking ``--config``/``-c``,
    ``--print-config``, ``--dry-run`` and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        prog="unifyreg",
        description="Entropy probes and a contextual-prediction regularizer for UMMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, _, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", "-c", help="YAML config file (defaults if omitted)")
        cmd.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )
        cmd.add_argument(
            "--dry-run",
            action="store_true",
            help="check the config, files, model and layers; stop before any work",
        )
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unifyreg`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    schema, runner, _ = COMMANDS[args.command]
    try:
        cfg = load_config(schema, args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        return runner(cfg, dry_run=args.dry_run)
    except ConfigError as error:
        print(f"unifyreg {args.command}: config error: {error}", file=sys.stderr)
        return 2
    except ManifestError as error:
        print(f"unifyreg {args.command}: bad example: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        print(
            f"unifyreg {args.command}: write failed: {error}. Every file written before is "
            "complete (each is written to a temporary file and renamed into place); free "
            "space and run the command again (finetune: with resume=last, from the last "
            "finished epoch)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
