"""Train the default toy base for N steps in this process and print a hash of its weights.

Two runs that print the same hash trained bit-identical weights. Usage:
``python scripts/check_determinism.py STEPS`` (run it twice, under load and idle, or
against another version with ``PYTHONPATH`` at its tree). The schedule is the default
2,700-step one, cut at STEPS; no checkpoint, logger or progress bar.
"""

from __future__ import annotations

import hashlib
import sys

import lightning as L
import torch

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import PretrainToyConfig
from unifyreg.module import UMMModule, example_loader
from unifyreg.toy.splits import build_splits
from unifyreg.toy.tokenizer import WordTokenizer


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    cfg = PretrainToyConfig()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = build_splits(cfg.world)
    tokenizer = WordTokenizer.for_world(cfg.world)
    adapter = ToyAdapter.create(tokenizer, cfg.world.grid_size, cfg.model, seed=cfg.seed)
    module = UMMModule(adapter, cfg.optim, total_steps=cfg.max_steps)
    loader = example_loader(adapter, splits["pretrain"], cfg.batch_size, shuffle=True, seed=0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.optim.grad_clip,
    )
    trainer.fit(module, loader)
    digest = hashlib.sha256()
    for _, tensor in sorted(adapter.model.state_dict().items()):
        digest.update(tensor.detach().numpy().tobytes())
    print(f"{steps} steps, {torch.get_num_threads()} threads: {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
