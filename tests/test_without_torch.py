"""torch is optional at run time: installing sweeper does not pull it, and every command works
in a process (and in the processes it starts) where ``import torch`` fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from conftest import REPO_ROOT, CliRun
from trees import save_full

# Put first on PYTHONPATH: every interpreter sweeper starts (forked workers, the daemon's reader
# started afresh) finds torch unimportable, as on a machine without it.
_NO_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


def without_torch(tmp_path: Path, *args: str | os.PathLike[str]) -> CliRun:
    """``python ARGS`` where torch cannot be imported."""
    hide = tmp_path / "no-torch"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(_NO_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{hide}:{REPO_ROOT}"}
    env.pop("JOURNAL_STREAM", None)
    done = subprocess.run(
        [sys.executable, *(os.fspath(a) for a in args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return CliRun(done.returncode, done.stdout, done.stderr)


def test_installing_sweeper_does_not_pull_torch() -> None:
    """What pip installs for ``sweeper``, read from the installed distribution's metadata."""
    requires = metadata.requires("sweeper") or []
    name = re.compile(r"^\s*([A-Za-z0-9_.-]+)")

    def named(requirement: str) -> str:
        found = name.match(requirement)
        assert found is not None, requirement
        return found.group(1).lower()

    runtime = [r for r in requires if "extra ==" not in r]
    assert runtime and "torch" not in {named(r) for r in runtime}, runtime
    # The tests and benchmarks do use it: the dev extra carries it.
    assert "torch" in {named(r) for r in requires if 'extra == "dev"' in r}


def test_every_command_runs_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    hidden = without_torch(tmp_path, "-c", "import torch")
    assert "hidden by the test" in hidden.stderr  # the hiding works (so this test can fail)
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(run / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=10**18 + epoch)
    ledger = tmp_path / "ledger.jsonl"
    root = tmp_path / "root"

    inspected = without_torch(tmp_path, "-m", "sweeper", "inspect", run / "epoch_1.pt")
    assert inspected.returncode == 0, inspected.stderr
    assert "full training checkpoint" in inspected.stdout
    dry = without_torch(
        tmp_path, "-m", "sweeper", "sweep", root, "min_age_seconds=0", "--dry-run", "--json"
    )
    assert dry.returncode == 0, dry.stderr
    expected = dry.json()["expected_reclaimed_bytes"]
    assert expected > 0
    swept = without_torch(
        tmp_path, "-m", "sweeper", "sweep", root, "min_age_seconds=0", "--json", "--ledger", ledger
    )
    assert swept.returncode == 0, swept.stderr
    assert swept.json()["reclaimed_bytes"] == expected
    assert (run / "epoch_1_inference.pt").exists() and not (run / "epoch_1.pt").exists()
    summary = without_torch(tmp_path, "-m", "sweeper", "ledger", "--ledger", ledger, "--json")
    assert summary.returncode == 0, summary.stderr
    assert summary.json()["reclaimed_bytes"] == expected
