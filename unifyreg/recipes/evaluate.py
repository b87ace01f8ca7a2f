"""Recipe ``eval``: exact-match accuracy of a toy model per split, task and category.

Loads ``model_path`` (a directory written by ``pretrain-toy`` or a fine-tune), or the
cached toy base of the ``pretrain`` section (training it first if absent), answers every
example of the chosen splits by greedy generation, prints a table and writes JSON.
"""

from __future__ import annotations

from pathlib import Path

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import ConfigError, EvalConfig
from unifyreg.fileio import atomic_write_json
from unifyreg.toy.base import build_toy_base, cache_path
from unifyreg.toy.evaluation import accuracy_table, evaluate_examples
from unifyreg.toy.splits import build_splits

__all__ = ["run"]


def run(cfg: EvalConfig, dry_run: bool = False) -> int:
    """Command ``unifyreg eval`` (``dry_run``: check the splits and the model, answer nothing)."""
    splits = build_splits(cfg.pretrain.world)
    unknown = [name for name in cfg.splits if name not in splits]
    if unknown:
        raise ConfigError(f"splits: unknown split(s) {unknown}; valid: {', '.join(sorted(splits))}")
    if cfg.model_path:
        path = Path(cfg.model_path)
        if not path.is_dir():
            raise ConfigError(f"model_path: directory {str(path)!r} does not exist")
    elif dry_run:
        path = cache_path(cfg.pretrain)
    else:
        path = build_toy_base(cfg.pretrain)
    if dry_run:
        print(f"dry run: model {path}, splits {cfg.splits}; nothing evaluated")
        return 0
    adapter = ToyAdapter.load(path)
    if cfg.decode_steps:
        adapter.decode_steps = cfg.decode_steps
    results = evaluate_examples(
        adapter, {name: splits[name] for name in cfg.splits}, cfg.batch_size
    )
    results["model_path"] = str(path)
    print(accuracy_table(results))
    atomic_write_json(cfg.output, results)
    print(f"wrote {cfg.output}")
    return 0
