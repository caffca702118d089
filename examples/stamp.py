"""Set the example tree's modification times from ``ages.json`` (git keeps none).

    python3 examples/stamp.py [TREE]

TREE defaults to ``examples/results/checkpoints``; a copy of it (``cp -r``) is stamped the same
way.  Each file's mtime becomes now minus its recorded age, so the tree looks as it would on a
server: written over two weeks, an hour apart, in the order the runs wrote them.  Standard
library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stamp(tree: Path, now: float | None = None) -> int:
    ages: dict[str, int] = json.loads((HERE / "ages.json").read_text())
    now = time.time() if now is None else now
    for relative, age in ages.items():
        path = tree / relative
        if path.is_file() and not path.is_symlink():
            os.utime(path, (now - age, now - age), follow_symlinks=False)
    return len(ages)


def main(argv: list[str]) -> int:
    tree = Path(argv[0]) if argv else HERE / "results" / "checkpoints"
    if not tree.is_dir():
        print(f"stamp.py: {tree}: no such folder", file=sys.stderr)
        return 2
    stamp(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
