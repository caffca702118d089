"""Regenerate the example tree the README's first command sweeps: ``examples/results/checkpoints``.

    .venv/bin/python examples/make_examples.py      # needs the dev extra (torch, lightning,
                                                    # transformers); rewrites the tree

Real checkpoints of tiny models, written by the real libraries, in the situations sweeper exists
for (each run folder's README line says what sweeper should make of it):

- ``./``: the seed guide's layout: ``checkpoint_epoch_1..4.pt`` (model, AdamW, scheduler, epoch,
  best_val_acc and an OmegaConf config with an ``${oc.env:...}`` interpolation) and a
  ``best_model.pt`` rewritten in place, whose inference copy sweeper made from an earlier
  version (stale);
- ``restarted/``: a run restarted in the same folder: epochs 1..3, then 1..2 written later;
- ``lightning/``: a Lightning ``Trainer`` with ``ModelCheckpoint(save_top_k=-1, save_last=True)``;
- ``hf/``: a Hugging Face ``Trainer``'s ``checkpoint-2/ -4/ -6/`` (tiny GPT-2);
- ``broken/``: a checkpoint cut short by a killed writer, and one whose pickle would call a
  function sweeper does not allow.

Git does not keep modification times, and retention reads them: ``ages.json`` holds each
file's age, and ``examples/stamp.py`` (the standard library only) sets every mtime from it before
a sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TREE = HERE / "results" / "checkpoints"
AGES = HERE / "ages.json"
HOUR = 3600
OLDEST = 14 * 24 * HOUR  # the first file written is two weeks old; each next one an hour younger


class Ages:
    """Each file's age, in the order written: later means younger."""

    def __init__(self) -> None:
        self.ages: dict[str, int] = {}
        self.next = OLDEST

    def wrote(self, *paths: Path) -> None:
        for path in paths:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                self.ages[str(file.relative_to(TREE))] = self.next
            self.next -= HOUR


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _full(epoch: int, seed: int, val_acc: float) -> dict[str, Any]:
    """What the seed guide's training loop saves."""
    from omegaconf import OmegaConf

    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    config = OmegaConf.create(
        {
            "model": {"name": "mlp", "hidden": 32},
            "data": {"root": "${oc.env:DATA_DIR,/data}/cifar", "batch_size": 64},
            "train": {"epochs": 10, "lr": 1e-3},
        }
    )
    return {
        "epoch": epoch,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "best_val_acc": val_acc,
        "config": config,
    }


def plain(ages: Ages) -> None:
    """The seed guide's run: four epochs and best_model.pt, whose copy is stale."""
    accuracy = {1: 0.61, 2: 0.74, 3: 0.81, 4: 0.79}
    for epoch, acc in accuracy.items():
        path = TREE / f"checkpoint_epoch_{epoch}.pt"
        torch.save(_full(epoch, epoch, acc), path)
        ages.wrote(path)
        if epoch == 2:  # the best so far: best_model.pt, and sweeper made its copy then
            torch.save(_full(2, 2, acc), TREE / "best_model.pt")
            done = subprocess.run(
                [sys.executable, "-m", "sweeper", "extract", str(TREE / "best_model.pt")],
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            ages.wrote(TREE / "best_model_inference.pt")
    torch.save(_full(3, 3, accuracy[3]), TREE / "best_model.pt")  # rewritten in place
    ages.wrote(TREE / "best_model.pt")


def restarted(ages: Ages) -> None:
    """Epochs 1..3, then the job restarted from scratch in the same folder: epochs 1..2."""
    folder = TREE / "restarted"
    folder.mkdir()
    for attempt, epochs in (("2026-11-01", (1, 2, 3)), ("2026-11-08", (1, 2))):
        for epoch in epochs:
            path = folder / f"run-{attempt}-epoch{epoch}.pt"
            torch.save(_full(epoch, 10 * epoch + len(attempt), 0.5 + epoch / 10), path)
            ages.wrote(path)


def lightning(ages: Ages) -> None:
    import lightning as L

    class Regressor(L.LightningModule):  # type: ignore[misc]
        def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
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
            return {
                "optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1),
            }

    folder = TREE / "lightning"
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    saver = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=folder, save_top_k=-1, save_last=True, monitor="val_loss"
    )
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Regressor(), loader, loader)
    for path in sorted(folder.iterdir(), key=lambda p: (p.name == "last.ckpt", p.name)):
        ages.wrote(path)


def hugging_face(ages: Ages) -> None:
    """A tiny GPT-2, saved every 2 steps for 6: checkpoint-2/ -4/ -6/."""
    from torch.utils.data import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(8) + index) % 50
            return {"input_ids": ids, "labels": ids}

    folder = TREE / "hf"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    arguments = TrainingArguments(
        output_dir=str(folder),
        max_steps=6,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    model = GPT2LMHeadModel(config)
    Trainer(model=model, args=arguments, train_dataset=Tokens(), eval_dataset=Tokens()).train()
    for step in (2, 4, 6):
        ages.wrote(folder / f"checkpoint-{step}")


class _Calls:
    """Pickles as a call of ``print``: what a booby-trapped checkpoint does with os.system."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("a pickle sweeper must never unpickle ran this",))


def broken(ages: Ages) -> None:
    folder = TREE / "broken"
    folder.mkdir()
    cut = folder / "epoch_7.pt"
    torch.save(_full(7, 7, 0.7), cut)
    os.truncate(cut, cut.stat().st_size // 2)  # a writer killed half way
    trapped = folder / "downloaded_model.pt"
    torch.save({**_full(1, 1, 0.9), "extra": _Calls()}, trapped)
    ages.wrote(cut, trapped)


def main() -> int:
    warnings.simplefilter("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    ages = Ages()
    plain(ages)
    restarted(ages)
    lightning(ages)
    hugging_face(ages)
    broken(ages)
    AGES.write_text(json.dumps(ages.ages, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in TREE.rglob("*") if p.is_file())
    print(f"{len(ages.ages)} files, {size} bytes in {TREE.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
