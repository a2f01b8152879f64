"""What a benchmark report records about where it ran (the code's commit), and where it goes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def commit() -> str:
    """$BAGEL_COMMIT (set where the tree has no .git, e.g. the GPU machine), else git's HEAD."""
    if os.environ.get("BAGEL_COMMIT"):
        return os.environ["BAGEL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def write_report(report: dict, out: str | Path, filename: str) -> Path:
    """Write `report` as indented JSON to out/filename (making the folder); returns the path."""
    path = Path(out) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
