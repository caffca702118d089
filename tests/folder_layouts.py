"""Checkpoint folders written by the real libraries: a Hugging Face ``Trainer`` (tiny GPT-2,
``save_steps``), accelerate's ``save_state`` with automatic checkpoint naming, and
``torch.distributed.checkpoint.save``.  DeepSpeed cannot run here (no GPU, no build for the
CPU torch), so its ZeRO folders are written by hand after ``DeepSpeedEngine.save_checkpoint``
(``global_stepN/mp_rank_00_model_states.pt``, ``zero_pp_rank_R_mp_rank_00_optim_states.pt``,
``latest`` and ``zero_to_fp32.py`` beside them), with ``torch.save`` as DeepSpeed does.

The libraries keep process-wide state (accelerate's ``AcceleratorState`` is shared by the
Trainer): each run is a subprocess, ``python tests/folder_layouts.py LAYOUT FOLDER``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def write(layout: str, folder: Path, *extra: str) -> None:
    """Run one writer below in a fresh interpreter."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(HERE), layout, str(folder), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _hf_trainer(output: Path, steps: int) -> None:
    """A tiny GPT-2 trained ``steps`` steps, saved and evaluated every 2.  The best checkpoint
    is the one with the highest eval loss (greater_is_better=True): the first, as the loss
    falls, so it is not among the newest."""
    from torch.utils.data import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(8) + index) % 50
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    args = TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens()).train()


def _accelerate(project: Path, saves: int) -> None:
    """A linear model, AdamW and a scheduler prepared by accelerate, stepped and saved
    ``saves`` times: ``project/checkpoints/checkpoint_0`` ..."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    torch.manual_seed(0)
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=str(project), automatic_checkpoint_naming=True
        ),
    )
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(saves):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        accelerator.save_state()


def _dcp(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(folder))


def add_zero_shards(checkpoint: Path, step: int, ranks: int = 2) -> None:
    """What DeepSpeed's ``save_checkpoint`` adds to a Trainer checkpoint run under ZeRO: a
    ``global_stepN/`` of per-rank shards, ``latest`` naming it, and the consolidation script."""
    shards = checkpoint / f"global_step{step}"
    shards.mkdir()
    torch.manual_seed(step)
    module = {"w": torch.randn(16, 16, dtype=torch.bfloat16)}
    torch.save(
        {"module": module, "global_steps": step, "ds_version": "0.19.8", "dp_world_size": ranks},
        shards / "mp_rank_00_model_states.pt",
    )
    for rank in range(ranks):
        flat = torch.randn(128)
        state = {"state": {0: {"exp_avg": flat, "exp_avg_sq": flat.abs()}}, "param_groups": []}
        torch.save(
            {"optimizer_state_dict": {"base_optimizer_state": state}, "ds_version": "0.19.8"},
            shards / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        )
    (checkpoint / "latest").write_text(f"global_step{step}")
    (checkpoint / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")


def deepspeed_alone(folder: Path, steps: list[int]) -> None:
    """DeepSpeed's own save folder: ``global_stepN/`` shards and ``latest``, no consolidated
    weights anywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        holder = folder / f"tmp{step}"
        holder.mkdir()
        add_zero_shards(holder, step)
        (holder / f"global_step{step}").rename(folder / f"global_step{step}")
        for name in ("latest", "zero_to_fp32.py"):
            (holder / name).replace(folder / name)
        holder.rmdir()


def trainer_state(checkpoint: Path) -> dict[str, object]:
    state: dict[str, object] = json.loads((checkpoint / "trainer_state.json").read_text())
    return state


def main(argv: list[str]) -> None:
    warnings.simplefilter("ignore")
    layout, folder = argv[0], Path(argv[1])
    if layout == "hf":
        _hf_trainer(folder, int(argv[2]) if len(argv) > 2 else 8)
    elif layout == "accelerate":
        _accelerate(folder, int(argv[2]) if len(argv) > 2 else 4)
    elif layout == "dcp":
        _dcp(folder)
    else:
        raise SystemExit(f"unknown layout {layout!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
