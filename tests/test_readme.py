"""The README's promises: its configuration reference is current, its example configs load."""

import re
from pathlib import Path

import pytest

from hgdpo.config.core import load_config, markdown_table
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.sample_config import SampleConfig
from hgdpo.interchange.config import ImportConfig, PairsExportConfig
from hgdpo.pool.config import PoolConfig
from hgdpo.replication.replicate import ReplicateConfig
from hgdpo.run import RunConfig
from hgdpo.sweep.config import SweepConfig
from hgdpo.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"PoolConfig": PoolConfig, "TrainConfig": TrainConfig, "SampleConfig": SampleConfig,
           "SweepConfig": SweepConfig, "EvalConfig": EvalConfig, "RunConfig": RunConfig,
           "ReplicateConfig": ReplicateConfig, "ImportConfig": ImportConfig, "PairsExportConfig": PairsExportConfig}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configuration_reference_is_current(name):
    readme = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- config:{name} -->\n(.*?)\n<!-- /config:{name} -->", readme, re.S)
    assert found, f"README has no reference section for {name}"
    assert found.group(1) == markdown_table(CONFIGS[name]), "regenerate it with hgdpo.config.core.markdown_table"


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


def test_the_demo_runs_the_whole_method_and_the_evaluate_example_reads_its_adapter():
    assert "jobs/run.py --config examples/run.yaml" in (REPO / "Makefile").read_text()
    run = load_config(RunConfig, REPO / "examples" / "run.yaml")
    pool_cfg, train_cfg, eval_cfg = run.stages()
    assert (REPO / run.train_prompts).is_file() and (REPO / run.test_prompts).is_file()
    assert train_cfg.pool == pool_cfg.output and eval_cfg.adapter == f"{train_cfg.output}/adapter"
    assert "judge" in eval_cfg.scorers and eval_cfg.model == "embedded"
    evaluation = load_config(EvalConfig, REPO / "examples" / "evaluate.yaml")
    assert evaluation.adapter == eval_cfg.adapter and evaluation.prompts == run.test_prompts


def test_readme_picture_exists():
    assert "docs/world-samples.png" in (REPO / "README.md").read_text()
    assert (REPO / "docs" / "world-samples.png").stat().st_size > 10_000
