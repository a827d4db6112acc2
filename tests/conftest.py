"""Shared fixtures: one local Ray for the session, the PartiPrompts file beside the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/servers.py

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


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3-compatible server (moto) on 127.0.0.1 for the session, with a bucket ``hgdpo-test``.

    Yields a :class:`tests.servers.S3`; its ``env`` (endpoint, region, fake credentials) is what
    a process needs to use it."""
    from servers import start_s3

    store = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        store.client().create_bucket(Bucket="hgdpo-test")
        yield store
    finally:
        store.server.stop()


@pytest.fixture()
def s3_env(s3, monkeypatch):
    """This test process configured for the session's S3 server, as a job would be."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3
