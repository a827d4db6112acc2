"""Shared fixtures: an isolated cache for the embedded models, one local Ray for the session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The embedded default is built once per test session into its own cache, before anything
# imports it (Ray workers inherit HGDPO_* variables from the driver).
os.environ.setdefault("HGDPO_HOME", tempfile.mkdtemp(prefix="hgdpo-test-home-"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for all tests that run jobs in-process (startup costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HGDPO_HOME": os.environ["HGDPO_HOME"]}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def parti_prompts() -> Path:
    path = SHARED_DATA / "PartiPrompts.tsv"
    if not path.is_file():
        pytest.skip("PartiPrompts.tsv not found beside the project (../shared/data)")
    return path
