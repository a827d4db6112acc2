"""Shared fixtures: one local Ray for the session, the PartiPrompts file beside the project."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for all tests that run jobs in-process (startup costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def parti_prompts() -> Path:
    path = SHARED_DATA / "PartiPrompts.tsv"
    if not path.is_file():
        pytest.skip("PartiPrompts.tsv not found beside the project (../shared/data)")
    return path
