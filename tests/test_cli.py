"""One command: ``hgdpo <stage>`` is ``jobs/<stage>.py`` (same settings, same outputs), ``--help`` lists every
setting, and the exit codes are 0 done, 2 bad input, 1 failure."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hgdpo import cli, stages

REPO = Path(__file__).resolve().parents[1]
JOBS = {"pool": "build_pool", "train": "train", "sample": "sample", "evaluate": "evaluate", "sweep": "sweep",
        "run": "run", "replicate": "replicate", "export-lora": "export_lora", "import": "import_pairs",
        "export": "export_pairs"}


def test_every_job_is_a_stage_of_the_command_and_the_help_lists_them(capsys):
    scripts = {p.stem for p in (REPO / "jobs").glob("*.py")}
    assert set(JOBS.values()) | {"study"} == scripts
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in list(JOBS) + ["study", "table", "verify", "duel"]:
        assert f"  {name} " in out or f"{{{name}" in out or f",{name}" in out, name


@pytest.mark.parametrize("name", sorted(n for n in stages.STAGES))
def test_a_stages_help_lists_every_setting_of_its_config(name, capsys):
    argv = name.split() + ["--help"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hgdpo {name} ")
    for field in dataclasses.fields(stages.STAGES[name].config_class()):
        assert f"  {field.name} (" in out, field.name


def test_bad_input_exits_2_naming_the_setting_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["train", f"pool={tmp_path / 'none'}", f"output={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: train.pool: {tmp_path / 'none'} is not a pool")
    assert cli.main(["sample", "prompts=p.txt", f"output={tmp_path / 'out'}", "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert cli.main(["run", "other.steps=3"]) == 2  # a section the run does not have
    assert "unknown section 'other'" in capsys.readouterr().err
    assert cli.main(["study", "vote"]) == 2 and "usage: hgdpo study {create," in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failure_exits_1_with_its_traceback(monkeypatch, tmp_path, capsys):
    """A stage that fails (not bad input: an error of the program or the machine) exits 1 and shows where."""
    monkeypatch.setitem(stages.STAGES, "sample", dataclasses.replace(stages.STAGES["sample"],
                                                                     runner="tests_cli_helpers:explode"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tests_cli_helpers.py").write_text("def explode(cfg, args):\n    raise OSError('disk on fire')\n")
    assert cli.main(["sample", "prompts=p.txt", f"output={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "OSError: disk on fire" in err and "error: sample failed" in err


def test_the_command_and_the_job_script_make_the_same_output(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle on the left\n")
    settings = [f"prompts={tmp_path / 'p.txt'}", "images_per_prompt=1", "steps=2"]
    command = subprocess.run([str(Path(sys.executable).parent / "hgdpo"), "sample", *settings,
                              f"output={tmp_path / 'cmd'}"], capture_output=True, text=True, timeout=300)
    script = subprocess.run([sys.executable, str(REPO / "jobs" / "sample.py"), *settings,
                             f"output={tmp_path / 'job'}"], capture_output=True, text=True, timeout=300)
    assert command.returncode == 0 and script.returncode == 0, command.stderr + script.stderr
    assert command.stdout.startswith("sample: 1 images written to") and script.stdout.startswith("sample: 1 images")
    made = [json.loads((tmp_path / d / "samples.json").read_text()) for d in ("cmd", "job")]
    assert [f["file"] for f in made[0]["files"]] == [f["file"] for f in made[1]["files"]]
    name = made[0]["files"][0]["file"]
    assert (tmp_path / "cmd" / name).read_bytes() == (tmp_path / "job" / name).read_bytes()
