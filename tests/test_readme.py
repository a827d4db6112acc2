"""The README's promises: its configuration reference is current, its example configs load."""

import re
from pathlib import Path

import pytest

from hgdpo.config import load_config, markdown_table
from hgdpo.pool_config import PoolConfig
from hgdpo.sample_config import SampleConfig
from hgdpo.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"PoolConfig": PoolConfig, "TrainConfig": TrainConfig, "SampleConfig": SampleConfig}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configuration_reference_is_current(name):
    readme = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- config:{name} -->\n(.*?)\n<!-- /config:{name} -->", readme, re.S)
    assert found, f"README has no reference section for {name}"
    assert found.group(1) == markdown_table(CONFIGS[name]), "regenerate it with hgdpo.config.markdown_table"


def test_makefile_commands_exist_and_handle_no_tests():
    makefile = (REPO / "Makefile").read_text()
    assert "demo:" in makefile and "test:" in makefile
    assert "torch==2.14.1" in makefile and "$$rc -eq 5" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_example_configs_load():
    cfg = load_config(PoolConfig, REPO / "examples" / "pool.yaml")
    assert cfg.model == "embedded" and (REPO / cfg.prompts).is_file()
    train = load_config(TrainConfig, REPO / "examples" / "train.yaml")
    assert train.pool == cfg.output and train.objective == "hgdpo"
    sample = load_config(SampleConfig, REPO / "examples" / "sample.yaml")
    assert sample.adapter == f"{train.output}/adapter" and sample.lan


def test_readme_picture_exists():
    assert "docs/world-samples.png" in (REPO / "README.md").read_text()
    assert (REPO / "docs" / "world-samples.png").stat().st_size > 10_000
