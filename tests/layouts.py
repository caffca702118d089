"""Checkpoints in the layouts of the libraries sweeper knows, written by those libraries.

Lightning's come from a real ``Trainer`` fitting a tiny module for a few CPU epochs.  timm
needs torchvision, whose builds here do not match the CPU torch, so its layout is written by
hand after timm's ``CheckpointSaver`` (timm/utils/checkpoint_saver.py): the same keys, an
``argparse.Namespace`` of arguments, ``torch.save`` to ``checkpoint-N.pth.tar``, and the hard
links it makes for ``last.pth.tar`` and ``model_best.pth.tar``.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def quiet_library() -> Iterator[None]:
    """The libraries' own warnings (few dataloader workers, deprecations of their
    dependencies) are not this suite's: it turns warnings into errors for sweeper's code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _lightning_module() -> type[Any]:
    with quiet_library():
        import lightning as L

    class Regressor(L.LightningModule):  # type: ignore[misc]
        """Two linear layers; hyper-parameters saved, Adam with a step scheduler."""

        def __init__(self, hidden: int = 8, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(4, hidden)
            self.out = torch.nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.net(x)))  # type: ignore[no-any-return]

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch: Any, index: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    return Regressor


LightningRegressor = None


def lightning_module() -> type[Any]:
    """The LightningModule class the Lightning checkpoints hold (made once)."""
    global LightningRegressor
    if LightningRegressor is None:
        LightningRegressor = _lightning_module()
    return LightningRegressor


def lightning_run(folder: Path, weights_only: Path, epochs: int = 4) -> None:
    """Fit for ``epochs`` CPU epochs, as ``ModelCheckpoint(save_top_k=-1, save_last=True)``
    monitoring val_loss saves them into ``folder`` (``epoch=0-step=2.ckpt``... and
    ``last.ckpt``); a second ``ModelCheckpoint(save_weights_only=True)`` writes the same
    epochs' weights-only files into ``weights_only``: what each inference copy should hold."""
    with quiet_library():
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint
        from torch.utils.data import DataLoader, TensorDataset

        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randn(16, 1))
        full = ModelCheckpoint(
            dirpath=folder,
            filename="{epoch}-{step}",
            save_top_k=-1,
            save_last=True,
            monitor="val_loss",
        )
        light = ModelCheckpoint(
            dirpath=weights_only, filename="{epoch}-{step}", save_top_k=-1, save_weights_only=True
        )
        trainer = L.Trainer(
            max_epochs=epochs,
            callbacks=[full, light],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            default_root_dir=folder.parent,
        )
        torch.manual_seed(0)
        trainer.fit(
            lightning_module()(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
        )


def timm_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )


def timm_args() -> argparse.Namespace:
    return argparse.Namespace(model="resnet_tiny", lr=0.05, epochs=5, amp=True, data_dir=None)


def timm_checkpoint(epoch: int, metric: float) -> dict[str, Any]:
    """What ``CheckpointSaver._save`` writes, in its order: epoch, arch, optimizer, version,
    args, amp_scaler (NativeScaler's ``state_dict_key``), state_dict, state_dict_ema, metric."""
    model = timm_model(epoch)
    ema = timm_model(100 + epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu")
    return {
        "epoch": epoch,
        "arch": "resnet_tiny",
        "optimizer": optimizer.state_dict(),
        "version": 2,
        "args": timm_args(),
        "amp_scaler": scaler.state_dict(),
        "state_dict": model.state_dict(),
        "state_dict_ema": ema.state_dict(),
        "metric": metric,
    }


def timm_run(folder: Path, metrics: list[float], mtime_ns: list[int]) -> dict[str, Any]:
    """Epochs 0.. saved as ``checkpoint-N.pth.tar``, as ``CheckpointSaver.save_checkpoint``
    does it: write ``last.pth.tar`` (through a temp file), then hard-link each epoch file to
    it, and ``model_best.pth.tar`` to the best one (higher metric is better, timm's default).
    Returns what each epoch saved, by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {}
    best: float | None = None
    last = folder / "last.pth.tar"
    for epoch, metric in enumerate(metrics):
        temp = folder / "tmp.pth.tar"
        checkpoint = timm_checkpoint(epoch, metric)
        torch.save(checkpoint, temp)
        os.utime(temp, ns=(mtime_ns[epoch], mtime_ns[epoch]))
        if last.exists():
            last.unlink()
        os.rename(temp, last)
        name = f"checkpoint-{epoch}.pth.tar"
        os.link(last, folder / name)
        saved[name] = checkpoint
        if best is None or metric > best:
            best = metric
            best_file = folder / "model_best.pth.tar"
            if best_file.exists():
                best_file.unlink()
            os.link(last, best_file)
    return saved


def timm_load_checkpoint(model: torch.nn.Module, path: Path, use_ema: bool = False) -> None:
    """timm.models.load_checkpoint as timm/models/_helpers.py has it (``load_state_dict``):
    ``torch.load(weights_only=True)``, then ``state_dict_ema`` or ``state_dict``, a
    ``module.`` prefix stripped, loaded strictly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    key = "state_dict_ema" if use_ema and "state_dict_ema" in checkpoint else "state_dict"
    state_dict = {k.removeprefix("module."): v for k, v in checkpoint[key].items()}
    model.load_state_dict(state_dict, strict=True)


def mmengine_checkpoint(epoch: int) -> dict[str, Any]:
    """What mmengine's ``Runner.save_checkpoint`` writes (mmengine/runner/runner.py): meta
    (epoch, iter, versions, seed), state_dict, optimizer, param_schedulers, message_hub and,
    with an EMA hook, ema_state_dict.  The message hub's logged scalars are HistoryBuffers of
    numpy arrays, which sweeper does not read: this one holds runtime info only."""
    model = timm_model(epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    iteration = 10 * (epoch + 1)
    return {
        "meta": {
            "epoch": epoch + 1,
            "iter": iteration,
            "mmengine_version": "0.10.7",
            "seed": 42,
            "experiment_name": "tiny_20261130",
            "time": "20261130_000000",
            "dataset_meta": {"classes": ("cat", "dog")},
        },
        "state_dict": model.state_dict(),
        "message_hub": {
            "log_scalars": {},
            "runtime_info": {"epoch": epoch + 1, "iter": iteration, "max_epochs": 4},
            "resumed_keys": {"epoch": True, "iter": True},
        },
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [scheduler.state_dict()],
        "ema_state_dict": timm_model(100 + epoch).state_dict(),
    }


def generic_checkpoint(epoch: int) -> dict[str, Any]:
    """A hand-rolled training script's file: weights under ``model`` beside optimizer-like
    keys (the shape many research repositories write)."""
    model = timm_model(epoch)
    optimizer = torch.optim.AdamW(model.parameters())
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "lr_sched": torch.optim.lr_scheduler.StepLR(optimizer, 1).state_dict(),
        "epoch": epoch,
        "best_acc": 0.5 + epoch / 10,
        "notes": {"dataset": "tiny", "seed": 3},
    }
