"""Recipe ``pretrain-toy``: train the toy UMM from scratch on the world's ``pretrain``
split, or reuse the cached base (:mod:`unifyreg.toy.base` has the steps: world and
tokenizer -> a fresh toy decoder -> Lightning ``Trainer.fit`` with a progress bar, a CSV
log and a ``last.ckpt`` every ``checkpoint_every_n_steps`` -> ``save_pretrained`` +
tokenizer -> exact-match evaluation -> cache). An interrupted build resumes."""

from __future__ import annotations

from unifyreg.config import PretrainToyConfig
from unifyreg.toy.base import build_toy_base, cache_path

__all__ = ["run"]


def run(cfg: PretrainToyConfig, dry_run: bool = False) -> int:
    """Command ``unifyreg pretrain-toy`` (``dry_run``: say where the base is or would be)."""
    if dry_run:
        path = cache_path(cfg)
        state = "cached" if path.is_dir() else "not built yet"
        print(f"dry run: toy base {path} ({state}); nothing trained")
        return 0
    build_toy_base(cfg)
    return 0
