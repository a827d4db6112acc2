"""Where MLflow runs go: which stores only this node reaches, and no password in a tracking URI."""

from __future__ import annotations

import pytest

from hgdpo.config.core import from_dict
from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.infra import tracking
from hgdpo.pool.config import PoolConfig


@pytest.mark.parametrize("uri, local", [
    ("sqlite:////data/mlflow.db", True), ("file:///data/mlruns", True), ("/data/mlruns", True),
    ("http://127.0.0.1:5000", True), ("http://localhost:5000", True), ("http://[::1]:5000", True),
    ("http://10.0.3.7:5000", False), ("https://mlflow.example.com", False), ("databricks", False),
    ("postgresql://db:5432/mlflow", False),
])
def test_which_stores_only_this_node_reaches(uri, local):
    assert tracking.is_local_store(uri) is local


def test_a_password_in_a_configured_tracking_uri_is_refused_without_repeating_it():
    with pytest.raises(ConfigError) as err:
        from_dict(PoolConfig, {"prompts": "p.txt", "output": "out", "mlflow_uri": "http://hg:pw-51x@10.0.0.2:5000"})
    assert str(err.value).startswith("pool.mlflow_uri: a password inside the tracking URI is refused")
    assert "pw-51x" not in str(err.value)


def test_a_password_in_the_environments_tracking_uri_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://hg:pw-51x@10.0.0.2:5000")
    with pytest.raises(HgdpoError, match=r"^MLFLOW_TRACKING_URI: a password inside the tracking URI is refused"):
        tracking.check_store(None, allow_local=False)
    assert tracking.redact("http://hg:pw-51x@10.0.0.2:5000") == "http://hg:***@10.0.0.2:5000"


def test_a_local_store_on_one_node_is_accepted(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    tracking.check_store(f"sqlite:///{tmp_path / 'mlflow.db'}", allow_local=False)  # no cluster: one node
