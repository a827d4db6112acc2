from dataclasses import dataclass

import pytest

from hgdpo.config.core import (
    check_fields,
    doc,
    from_dict,
    if_set_defaults,
    load_config,
    output_settings,
    parse_overrides,
    refuse_wired,
    rule_fields,
    wire,
)
from hgdpo.config.reference import markdown_table
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


@dataclass(kw_only=True)
class Toy:
    """A stage config with one field of each rule."""

    SECTION = "toy"

    size: int = doc("At least 2, changes the output.", 4, minimum=2, resume=True, sweep=True)
    pick: int | None = doc("Between 1 and size once set.", None, minimum=1, maximum="size", resume=True)
    rate: float = doc("Positive.", 0.5, above=0, sweep=True)
    newer: int = doc("Added after outputs were made.", 0, minimum=0, resume="if-set")
    data: str = doc("A file.", "x.txt", path=True)

    def __post_init__(self):
        check_fields(self)


@pytest.mark.parametrize("values, message", [
    ({"size": 1}, r"toy\.size: must be at least 2 \(got 1\)"),
    ({"pick": 5}, r"toy\.pick: must be between 1 and size=4 \(got 5\)"),  # a bound naming another setting
    ({"pick": 0}, r"toy\.pick: must be between 1 and size=4 \(got 0\)"),
    ({"rate": 0.0}, r"toy\.rate: must be positive \(got 0.0\)"),
    ({"newer": -1}, r"toy\.newer: must be >= 0 \(got -1\)"),
])
def test_bounds_declared_with_a_field_are_checked_naming_it(values, message):
    with pytest.raises(ConfigError, match=message):
        Toy(**values)
    Toy(pick=4, rate=1e-9)  # on the bounds (inclusive, exclusive) and an unset optional setting pass


def test_roles_declared_with_a_field_give_the_resume_fields_sweep_parameters_and_paths():
    assert rule_fields(Toy, "resume") == ("size", "pick", "newer")
    assert rule_fields(Toy, "sweep") == ("size", "rate") and rule_fields(Toy, "path") == ("data",)
    assert if_set_defaults(Toy) == {"newer": 0}
    # an "if-set" setting is stamped only off its default, so outputs made before it existed still match
    assert output_settings(Toy()) == {"size": 4, "pick": None}
    assert output_settings(Toy(newer=3)) == {"size": 4, "pick": None, "newer": 3}
    assert "| `size` | int | `4` | at least 2; resume; sweep |" in markdown_table(Toy)
    assert "| `newer` | int | `0` | >= 0; resume (if set) |" in markdown_table(Toy)


def test_the_train_configs_fingerprint_fields_and_sweep_parameters_come_from_the_fields():
    from hgdpo.sweep.config import EVAL_PARAMETERS, TRAIN_PARAMETERS
    from hgdpo.train.config import RESUME_FIELDS, TrainConfig

    assert {"beta", "lambda_stat", "focus_alpha_d", "kto_lambda_d", "timestep_max"} <= set(RESUME_FIELDS)
    assert not {"workers", "micro_batch", "checkpoint_every", "mlflow_uri"} & set(RESUME_FIELDS)  # how, not what
    assert TRAIN_PARAMETERS[:3] == ("objective", "pool_size", "loser_rank") and "kto_lambda_u" in TRAIN_PARAMETERS
    assert "workers" not in TRAIN_PARAMETERS and EVAL_PARAMETERS == ("alpha", "lan")
    cfg = TrainConfig(pool="p", output="o")
    assert set(cfg.resume_settings()) == set(RESUME_FIELDS) - {"timestep_min", "timestep_max", "kto_lambda_d",
                                                                "kto_lambda_u"}


def test_a_job_that_wires_stages_refuses_what_it_sets_and_names_the_stage():
    with pytest.raises(ConfigError, match=r"run\.pool\.output: set by the run itself \(see run\.output\); remove it"):
        refuse_wired({"steps": 3, "output": "x"}, {"output": "/r/pool", "prompts": "p"}, "run.pool", "run",
                     "run.output")
    cfg = wire(PoolConfig, {"steps": 3, "mlflow_uri": "sqlite:///m.db"}, {"prompts": "p", "output": "/r/pool"},
               {"mlflow_uri": "sqlite:///run.db", "images_per_prompt": 6}, "run.")
    assert (cfg.steps, cfg.output, cfg.images_per_prompt, cfg.mlflow_uri) == (3, "/r/pool", 6, "sqlite:///m.db")
    with pytest.raises(ConfigError, match=r"^run\.pool\.steps: must be at least 1"):
        wire(PoolConfig, {"steps": 0}, {"prompts": "p", "output": "o"}, where="run.")
    assert from_dict(PoolConfig, {"prompts": "p", "output": "o"}).steps == 50
