"""Shared fixtures: the parity fixture folder (env BAGEL_FIXTURE) and executors on it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.local import LocalExecutor

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(os.environ.get("BAGEL_FIXTURE", REPO.parent / "shared" / "fixtures" / "bagel-tiny")).resolve()


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "cases.json").is_file():
        pytest.fail(f"parity fixture not found at {FIXTURE} (set BAGEL_FIXTURE)")
    return FIXTURE


@pytest.fixture(scope="session")
def checkpoint_dir(fixture_dir: Path) -> Path:
    return fixture_dir / json.loads((fixture_dir / "cases.json").read_text()).get("checkpoint_dir", "checkpoint")


@pytest.fixture(scope="session")
def cases(fixture_dir: Path) -> dict:
    return {c["name"]: c for c in json.loads((fixture_dir / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="session")
def reference(fixture_dir: Path) -> dict[str, torch.Tensor]:
    doc = json.loads((fixture_dir / "cases.json").read_text())
    return load_file(str(fixture_dir / doc.get("reference_file", "reference.safetensors")))


@pytest.fixture(scope="session")
def executor(checkpoint_dir: Path) -> LocalExecutor:
    return LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def ray_url():
    """The session's only Ray instance (and Serve's HTTP proxy); shut down at the end."""
    from .service_app import local_ray

    with local_ray(num_cpus=2) as url:
        yield url
