"""The naive baseline for sweep planning: classify every checkpoint the way people do today.

    python bench/naive_classify.py ROOT [ROOT ...]

Expands each ROOT with ``glob``, walks it with ``os.walk``, loads every ``*.pt`` / ``*.pth`` /
``*.ckpt`` with ``torch.load(path, map_location="cpu", weights_only=False)`` and looks at the
keys: optimizer state means a full training checkpoint, a model state dict without it an
inference checkpoint, a flat dict of tensors bare weights.  Prints the counts as one JSON object.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sys
from collections import Counter

import torch

PATTERNS = ("*.pt", "*.pth", "*.ckpt")
TRAINING_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states")
MODEL_KEYS = ("model_state_dict", "state_dict", "model")


def classify(checkpoint: object) -> str:
    if not isinstance(checkpoint, dict):
        return "other"
    if any(key in checkpoint for key in TRAINING_KEYS):
        return "full"
    if any(key in checkpoint for key in MODEL_KEYS):
        return "inference"
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return "weights"
    return "other"


def main(patterns: list[str]) -> int:
    counts: Counter[str] = Counter()
    for pattern in patterns:
        for root in sorted(glob.glob(pattern)):
            for folder, _, names in os.walk(root):
                for name in names:
                    if not any(fnmatch.fnmatchcase(name, p) for p in PATTERNS):
                        continue
                    path = os.path.join(folder, name)
                    try:
                        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
                    except Exception:  # a bad file is counted and skipped, as a user's loop would
                        counts["unreadable"] += 1
                        continue
                    counts[classify(checkpoint)] += 1
    print(json.dumps({"files": sum(counts.values()), "counts": dict(sorted(counts.items()))}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/naive_classify.py ROOT [ROOT ...]")
    sys.exit(main(sys.argv[1:]))
