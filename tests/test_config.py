import pytest

from hgdpo.config.core import load_config, markdown_table, parse_overrides
from hgdpo.errors import ConfigError
from hgdpo.pool.config import PoolConfig


def write(tmp_path, text):
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "prompts: p.txt\noutput: out\nimages_per_prompt: 6\nsteps: 10\n")
    cfg = load_config(PoolConfig, path, ["steps=4", "keep=pair", "guidance_scale=7", "category=People"])
    assert (cfg.images_per_prompt, cfg.steps, cfg.keep, cfg.category) == (6, 4, "pair", "People")
    assert cfg.guidance_scale == 7.0 and isinstance(cfg.guidance_scale, float)
    assert cfg.resolved_loser_rank() == 6
    assert load_config(PoolConfig, path, ["loser_rank=2"]).resolved_loser_rank() == 2


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = write(tmp_path, "prompts: p.txt\noutput: out\nimages_per_promt: 6\n")
    with pytest.raises(ConfigError, match=r"pool\.images_per_promt: unknown setting \(did you mean 'images_per_prompt'"):
        load_config(PoolConfig, path)
    with pytest.raises(ConfigError, match=r"pool\.gpus: unknown setting"):
        load_config(PoolConfig, None, ["prompts=p", "output=o", "gpus=1"])


@pytest.mark.parametrize("override, message", [
    ("images_per_prompt=1", r"pool\.images_per_prompt: must be at least 2"),
    ("loser_rank=1", r"pool\.loser_rank: must be between 2 and images_per_prompt=20 \(got 1\)"),
    ("loser_rank=21", r"pool\.loser_rank: must be between 2 and images_per_prompt=20 \(got 21\)"),
    ("steps=0", r"pool\.steps: must be at least 1"),
    ("width=700", r"pool\.width: must be a positive multiple of 8"),
    ("steps=ten", r"pool\.steps: must be an integer \(got 'ten'\)"),
    ("keep=some", r"pool\.keep: must be one of 'all' \| 'pair'"),
    ("generator_gpus=1.5", r"pool\.generator_gpus: must be a fraction"),
    ("allow_pickle=maybe", r"pool\.allow_pickle: must be true or false"),
])
def test_impossible_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PoolConfig, None, ["prompts=p.txt", "output=o", override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PoolConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PoolConfig, write(tmp_path, "prompts: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(PoolConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="pool.prompts: required"):
        load_config(PoolConfig, write(tmp_path, "output: o\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["steps"])


def test_reference_lists_every_field():
    table = markdown_table(PoolConfig)
    for name in ("prompts", "images_per_prompt", "loser_rank", "keep", "generator_gpus", "mlflow_uri"):
        assert f"| `{name}` |" in table


def test_a_retired_setting_says_what_replaced_it():
    from hgdpo.config.core import from_dict

    with pytest.raises(ConfigError, match=r"^pool\.scorer_gpus: no longer a setting: scoring runs in the generator "
                                          r"actors now"):
        from_dict(PoolConfig, {"prompts": "p.txt", "output": "out", "scorer_gpus": 0.5})


def test_a_setting_added_since_an_output_was_written_is_unchanged_at_its_default():
    from hgdpo.config.core import changed_settings
    from hgdpo.train.config import TrainConfig

    stored = {"pool": "p", "beta": 2500.0}  # written before timestep_min existed
    assert changed_settings(stored, {"pool": "p", "beta": 2500.0, "timestep_min": 0}, TrainConfig) == []
    assert changed_settings(stored, {"pool": "p", "beta": 2500.0, "timestep_min": 500}, TrainConfig) == ["timestep_min"]
    assert changed_settings(stored, {"pool": "p", "beta": 2500.0, "timestep_min": 0}) == ["timestep_min"]  # no class
    assert changed_settings({**stored, "timestep_min": 500}, {"pool": "p", "beta": 2500.0, "timestep_min": 0},
                            TrainConfig) == ["timestep_min"]  # stored, so compared
