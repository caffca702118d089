"""Build a full training checkpoint shaped like the seed guide's, for the extraction benchmark.

The seed guide's checkpoint is a ~332 MB fp32 model with AdamW state after training (2x the
model) in a ~1.0 GB file.  This builds one like it from a stack of square Linear layers (few,
large tensors keep the build cheap in time and RAM: model + grads + two moments, ~4x the model,
and no copy of it all at once), runs one real AdamW step and one scheduler step so the optimizer
and scheduler state are exactly what ``state_dict()`` gives after a step, and saves it with
``torch.save`` under the seed guide's keys, with an OmegaConf ``DictConfig`` as ``config``.

    python bench/make_checkpoint.py OUT [--width 4096] [--layers 5]
    python bench/make_checkpoint.py OUT --many 2000

The defaults give 83,906,560 parameters (335.6 MB of fp32), a file of about 1.0 GB.  ``--many N``
builds instead a model of N fp32 tensors of 1-100 KB (sizes log-uniform, seeded: ~21 KB on
average), trained one step the same way: with 2,000 tensors, a file of about 136 MB whose
inference copy holds 2,000 small records.  The file
appears atomically (temp name, fsync, rename), so a half-written one is never reused.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from omegaconf import OmegaConf
from torch import nn


def build_model(width: int, layers: int) -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks)


class ManySmall(nn.Module):
    """``count`` parameters of 1-100 KB, as a model of many small layers (norms, biases,
    adapters) saves them."""

    def __init__(self, count: int) -> None:
        super().__init__()
        sizes = torch.exp(torch.empty(count).uniform_(0.0, float(torch.log(torch.tensor(100.0)))))
        self.tensors = nn.ParameterList(
            nn.Parameter(torch.randn(int(256 * size))) for size in sizes.tolist()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((p.sum() for p in self.tensors), x.sum())


def training_config(width: int, layers: int) -> object:
    """A DictConfig like a Hydra/OmegaConf training run's, interpolations included."""
    return OmegaConf.create(
        {
            "experiment": "bench-extract",
            "seed": 0,
            "model": {"name": "mlp", "width": width, "layers": layers, "dropout": 0.1},
            "data": {"root": "${oc.env:HOME}/data", "batch_size": 8, "num_workers": 4},
            "optim": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05, "betas": [0.9, 0.999]},
            "sched": {"name": "cosine", "t_max": 100},
            "trainer": {"epochs": 100, "precision": 32, "out": "results/checkpoints"},
        }
    )


def build_checkpoint(width: int, layers: int, many: int = 0) -> dict[str, object]:
    torch.manual_seed(0)
    model = ManySmall(many) if many else build_model(width, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    batch = torch.randn(8, width)
    model(batch).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # frees the grads before the save
    return {
        "epoch": 1,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "best_val_acc": 0.8125,
        "config": training_config(width, layers),
    }


def save_atomically(checkpoint: dict[str, object], path: str) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f".{name}.partial")
    try:
        torch.save(checkpoint, temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the checkpoint")
    parser.add_argument("--width", type=int, default=4096, help="Linear layer width (4096)")
    parser.add_argument("--layers", type=int, default=5, help="number of Linear layers (5)")
    parser.add_argument("--many", type=int, default=0,
                        help="N small tensors (1-100 KB) instead of the Linear layers")  # fmt: skip
    args = parser.parse_args(argv)
    checkpoint = build_checkpoint(args.width, args.layers, args.many)
    save_atomically(checkpoint, args.out)
    params = sum(t.numel() for t in checkpoint["model_state_dict"].values())  # type: ignore[attr-defined]
    print(f"{args.out}: {params} parameters, {os.path.getsize(args.out)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
