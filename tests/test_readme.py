"""The README's promises: the configuration reference in docs/settings.md is current, its example configs
load, every docs page is linked from the README, and no relative link in the README or docs/ is broken."""

import re
from pathlib import Path

import pytest

from hgdpo.config.core import load_config
from hgdpo.config.reference import markdown_table
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.sample_config import SampleConfig
from hgdpo.interchange.config import ImportConfig, PairsExportConfig
from hgdpo.pool.config import PoolConfig
from hgdpo.replication.config import ReplicateConfig
from hgdpo.run import RunConfig
from hgdpo.sweep.config import SweepConfig
from hgdpo.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"PoolConfig": PoolConfig, "TrainConfig": TrainConfig, "SampleConfig": SampleConfig,
           "SweepConfig": SweepConfig, "EvalConfig": EvalConfig, "RunConfig": RunConfig,
           "ReplicateConfig": ReplicateConfig, "ImportConfig": ImportConfig, "PairsExportConfig": PairsExportConfig}


DOCS = REPO / "docs"
SETTINGS = DOCS / "settings.md"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configuration_reference_is_current(name):
    settings = SETTINGS.read_text()
    found = re.search(rf"<!-- config:{name} -->\n(.*?)\n<!-- /config:{name} -->", settings, re.S)
    assert found, f"docs/settings.md has no reference section for {name}"
    assert found.group(1) == markdown_table(CONFIGS[name]), "regenerate it with hgdpo.config.reference.markdown_table"


def test_configuration_reference_has_one_section_per_config():
    markers = re.findall(r"<!-- config:(\w+) -->", SETTINGS.read_text())
    assert sorted(markers) == sorted(CONFIGS), "one <!-- config:Name --> section per config, each once"


def _unfenced(text: str) -> str:
    """Markdown without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """Markdown without its code (fenced blocks and inline), where a bracket is not a link."""
    return re.sub(r"`[^`\n]*`", "", _unfenced(text))


def _links(text: str) -> list[str]:
    """The targets of the inline links and pictures of a Markdown text."""
    return re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)\)", _prose(text))


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _unfenced(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.split("#")[0]).resolve() for target in _links((REPO / "README.md").read_text())}
    missing = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md does not link to docs/{', docs/'.join(missing)}"


@pytest.mark.parametrize("page", _pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_point_at_files_that_exist(page):
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of the repository
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


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
