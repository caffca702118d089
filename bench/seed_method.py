"""The seed guide's method 2, option B, as users run it today: the baseline for sweeper.

    python bench/seed_method.py SRC OUT

Loads the whole checkpoint and saves the inference part with ``torch.save``, exactly as the
guide's code does: no fsync, so its output may still sit in the page cache when it exits.
"""

from __future__ import annotations

import sys

import torch


def main(src: str, out: str) -> None:
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    inference_checkpoint = {
        "model_state_dict": checkpoint["model_state_dict"],
        "config": checkpoint["config"],
        "epoch": checkpoint["epoch"],
        "best_val_acc": checkpoint["best_val_acc"],
    }
    torch.save(inference_checkpoint, out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/seed_method.py SRC OUT")
    main(sys.argv[1], sys.argv[2])
