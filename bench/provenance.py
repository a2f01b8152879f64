"""What a benchmark report records about where it ran: the code's commit."""
from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """$BAGEL_COMMIT (set where the tree has no .git, e.g. the GPU machine), else git's HEAD."""
    if os.environ.get("BAGEL_COMMIT"):
        return os.environ["BAGEL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
