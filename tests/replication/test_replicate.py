"""The replication runbook (jobs/replicate.py): one pool, the tables' trials as one sweep, Fig. 5a from the
pool, a report whose numbers are the trials' own; resumable; bad input refused before any work."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hgdpo.config.core import load_config
from hgdpo.errors import HgdpoError
from hgdpo.replication.config import ReplicateConfig
from hgdpo.replication.design import DUELS, trials
from hgdpo.replication.replicate import (
    make_public_pools,
    public_imports,
    sweep_config,
    unmade_public_pools,
)
from hgdpo.replication.report import Results, table1, targets
from hgdpo.report.winrates import WinRate
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import replicate as replicate_job  # noqa: E402

SETTINGS = ["pool.max_prompts=4", "pool.steps=3", "pool.rows_per_file=2", "pool.generator_cpus=0.5",
            "pool.writer_cpus=0.5", "train.max_steps=2", "train.global_batch=2", "train.micro_batch=1",
            "train.data_shards=1", "train.workers=1", "train.cpus_per_worker=0.5", "train.lora_rank=4",
            "train.checkpoint_every=1", "train.metrics_every=1", "train.probe_every=1", "evaluate.images_per_prompt=1",
            "evaluate.steps=3", "evaluate.bootstrap=200", "evaluate.generator_cpus=0.5", "evaluate.scorer_cpus=0.5",
            "only=[hgdpo,n=2]", "max_concurrent_trials=1"]


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = replicate_job.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def done(ray_local, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("replicate")
    write_prompts(tmp / "test.txt", 3, split="test", seed=3)
    args = ["--config", str(REPO / "examples" / "replicate.yaml"), f"output={tmp / 'out'}",
            f"train_prompts={REPO / 'examples' / 'world-train.txt'}", f"test_prompts={tmp / 'test.txt'}",
            f"mlflow_uri=sqlite:///{tmp / 'mlflow.db'}", f"notes={REPO / 'docs' / 'replication-notes.md'}", *SETTINGS]
    code, out, err = run_main(*args)
    assert code == 0, err + out[-3000:]
    return {"out": tmp / "out", "args": args, "log": out}


def _result(done, name: str) -> dict:
    return json.loads((done["out"] / "sweep" / "trials" / name / "result.json").read_text())


def test_the_report_holds_each_trials_own_numbers_and_marks_the_missing_ones(done):
    report = (done["out"] / "replication.md").read_text()
    for name, n in (("n=2", 2), ("hgdpo", 20)):
        m = _result(done, name)["metrics"]
        rate = f"{100 * m['win_rate_judge']:.1f}% [{100 * m['win_rate_judge_low']:.1f}, {100 * m['win_rate_judge_high']:.1f}]"
        row = next(line for line in report.splitlines() if line.startswith(f"| {n} |") and f"`{name}`" in line)
        assert rate in row and f"{m['s_change_pct']:+.2f}%" in row
        assert f"`{_result(done, name)['run_id']}`" in report
    # Table 3's head-to-head is measured; the trials not run leave their cells and targets unmeasured.
    assert "| `hgdpo` | `n=2` | " in report and "| `n=5` | `n=2` | - | - |" in report
    target = next(line for line in report.splitlines() if line.startswith("| Table 5: L-20 beats L-2"))
    assert target.endswith("| - | - |")
    assert "## Settings" in report and "only:" in report
    notes = (REPO / "docs" / "replication-notes.md").read_text().strip()
    assert "## What the measurements say\n\n" + notes in report


def test_the_pictures_are_written_beside_the_report(done):
    for name in ("replication-table3.png", "replication-table2.png"):
        image = Image.open(done["out"] / name)
        assert image.size == (560, 320) and len(set(image.convert("L").getdata())) > 2  # something is drawn


def test_fig_5a_at_n_equal_to_N_judges_the_pools_own_winner_and_loser_images(done):
    """The agreement at n = N from decoding the latents must equal the judge's verdict on the winner and
    loser PNGs the pool stored (another path to the same images)."""
    from hgdpo.pool import store as pool
    from hgdpo.world.judge import judge_details

    table = pool.read(done["out"] / "pool", columns=["prompt", "image_w", "image_l"])
    outcomes = []
    for prompt, w, lo in zip(*(table.column(c).to_pylist() for c in ("prompt", "image_w", "image_l"))):
        vw, vl = (judge_details(pool.png_image(b), prompt).violation for b in (w, lo))
        outcomes.append(1.0 if vw < vl else 0.5 if vw == vl else 0.0)
    agreement = json.loads((done["out"] / "agreement.json").read_text())
    assert set(agreement) == {"2", "5", "10", "20"}
    assert agreement["20"]["rate"] == pytest.approx(np.mean(outcomes))
    assert agreement["20"]["wins"] + agreement["20"]["ties"] + agreement["20"]["losses"] == 4


def test_a_rerun_does_no_finished_work_again(done):
    adapter = done["out"] / "sweep" / "trials" / "hgdpo" / "train" / "adapter" / "pytorch_lora_weights.safetensors"
    before = adapter.stat().st_mtime_ns, (done["out"] / "agreement.json").stat().st_mtime_ns
    code, out, err = run_main(*done["args"])
    assert code == 0, err
    assert "already complete" in out and "trial hgdpo finished earlier" in out and "trial n=2 finished earlier" in out
    assert "Fig. 5a: decoding" not in out
    assert (adapter.stat().st_mtime_ns, (done["out"] / "agreement.json").stat().st_mtime_ns) == before


def test_report_only_runs_nothing_and_marks_what_is_left(done):
    args = [a for a in done["args"] if not a.startswith("only=")] + ["only=[hgdpo,n=2,n=5]", "run=false"]
    code, out, err = run_main(*args)
    assert code == 0, err
    assert "training" not in out and not (done["out"] / "sweep" / "trials" / "n=5").exists()
    report = (done["out"] / "replication.md").read_text()
    assert "Not finished: n=5" in report and f"`{_result(done, 'hgdpo')['run_id']}`" in report


@pytest.mark.parametrize("setting, message", [
    ("only=[hgdpo,n=3]", "replicate.only[1]: no trial 'n=3'"),
    ("pool.images_per_prompt=10", "replicate.pool.images_per_prompt: the tables need N >= 20"),
    ("train.output=x", "replicate.train.output: set by the replicate itself"),
    ("notes=/no/such/notes.md", "replicate.notes: /no/such/notes.md is not a file"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, setting, message):
    code, _, err = run_main("--config", str(REPO / "examples" / "replicate.yaml"), f"output={tmp_path / 'out'}",
                            f"notes={REPO / 'docs' / 'replication-notes.md'}",
                            f"mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", setting)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_trials_cover_every_table_and_every_duel_names_two_of_them():
    names = [t["name"] for t in trials(300, "out")]
    assert len(names) == len(set(names)) == 15
    assert {t["dataset_size"] for t in trials(300, "out") if "dataset_size" in t} == {30, 150}
    assert all(a in names and b in names for a, b in DUELS)


def test_the_public_trials_are_dpo_on_their_own_pools_under_the_output():
    own = {t["name"]: t for t in trials(300, "/r/out") if "pool" in t}
    assert own == {"dpo-public": {"name": "dpo-public", "objective": "dpo", "lambda_stat": 0,
                                  "pool": "/r/out/public/pool"},
                   "dpo-public-h": {"name": "dpo-public-h", "objective": "dpo", "lambda_stat": 0,
                                    "pool": "/r/out/public/pool-h"}}
    assert ["hgdpo", "dpo-public"] in DUELS and ["hgdpo", "dpo-public-h"] in DUELS


def _config(tmp_path, *settings: str) -> ReplicateConfig:
    return load_config(ReplicateConfig, REPO / "examples" / "replicate.yaml",
                       [f"output={tmp_path / 'out'}", f"mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", *settings])


def test_the_public_pools_are_imported_from_one_set_with_the_replicates_model(tmp_path):
    public = tmp_path / "out" / "public"
    imports = public_imports(_config(tmp_path))
    assert list(imports) == ["dpo-public", "dpo-public-h"]
    assert {i.source for i in imports.values()} == {str(public / "world-public.parquet")}
    assert [(i.output, i.subset, i.model) for i in imports.values()] == [
        (str(public / "pool"), "all", "embedded"), (str(public / "pool-h"), "people", "embedded")]
    assert imports["dpo-public-h"].people_keywords == ["circle", "square", "triangle"]  # the world's subjects
    assert unmade_public_pools(_config(tmp_path)) == ["dpo-public", "dpo-public-h"]  # nothing made yet
    # A report-only run leaves the trials of unmade pools out of the sweep, with their duels.
    cfg = sweep_config(_config(tmp_path), 300, ["dpo-public"])
    names = [t["name"] for t in cfg.trials]
    assert "dpo-public" not in names and "dpo-public-h" in names
    assert ["hgdpo", "dpo-public"] not in cfg.duels and ["hgdpo", "dpo-public-h"] in cfg.duels
    assert {t.name: t.train.pool for t in cfg.expand()}["dpo-public-h"] == str(public / "pool-h")


def test_only_other_trials_make_no_public_work(tmp_path):
    cfg = _config(tmp_path, "only=[hgdpo,n=2]")
    assert public_imports(cfg) == {} and unmade_public_pools(cfg) == []
    logged = []
    make_public_pools(cfg, 300, logged.append)
    assert logged == [] and not (tmp_path / "out").exists()
    assert list(public_imports(_config(tmp_path, "only=[hgdpo,dpo-public-h]"))) == ["dpo-public-h"]


def test_the_public_set_and_its_pools_are_made_once_and_a_rerun_does_nothing(ray_local, tmp_path):
    from hgdpo.infra import storage
    from hgdpo.pool import store as pool

    cfg = _config(tmp_path, "only=[dpo-public-h]")
    logged: list[str] = []
    make_public_pools(cfg, 2, logged.append)  # 2 prompts: 8 public pairs
    public = tmp_path / "out" / "public"
    assert storage.parquet_rows(str(public / "world-public.parquet")) == 8
    assert pool.state(str(public / "pool-h")).complete is not None and not (public / "pool").exists()
    assert unmade_public_pools(cfg) == []
    stamp = (public / "pool-h" / "pool.json").stat().st_mtime_ns
    logged.clear()
    make_public_pools(cfg, 2, logged.append)
    assert any("already complete (8 pairs)" in line for line in logged), logged
    assert (public / "pool-h" / "pool.json").stat().st_mtime_ns == stamp
    with pytest.raises(HgdpoError, match="holds 8 pairs; the pool's 3 prompts need 12"):
        make_public_pools(cfg, 3, logged.append)


def test_table_1_has_the_public_rows_head_to_head_and_dashes_where_unmeasured():
    res = Results(metrics={}, duels={("hgdpo", "dpo-public"): {"judge": _rate(0.625, 0.55, 0.7),
                                                                "pickscore": _rate(0.8, 0.712, 0.875)},
                                     ("hgdpo", "sft"): {"judge": _rate(0.5, 0.4, 0.6)}})
    lines = table1(res)
    rows = [line for line in lines if line.startswith("| `hgdpo` |")]
    assert [r.split(" | ")[1] for r in rows] == ["`sft`", "`dpo-beta4`", "`dpo-beta20`", "`dpo`", "`dpo-public`",
                                                  "`dpo-public-h`"]
    assert rows[4] == "| `hgdpo` | `dpo-public` | 62.5% [55.0, 70.0] | 80.0% [71.2, 87.5] |"
    assert rows[5] == "| `hgdpo` | `dpo-public-h` | - | - |"  # not measured
    assert rows[0] == "| `hgdpo` | `sft` | 50.0% [40.0, 60.0] | - |"  # the same layout as the own-pool rows


def _rate(rate: float, low: float, high: float) -> WinRate:
    return WinRate(rate, low, high, 0, 0, 0, 0)


def test_targets_are_decided_from_the_measurements():
    def m(judge, low, s, h):
        return {"win_rate_judge": judge, "win_rate_judge_low": low, "win_rate_judge_high": judge + 0.05,
                "s_change_pct": s, "h_change_pct": h}

    res = Results(
        metrics={"dpo": m(0.60, 0.55, -6.0, 2.0), "hgdpo": m(0.58, 0.61, -1.0, 0.4), "n=2": m(0.55, 0.5, -2.0, 1.0),
                 "hgdpo-sampler": m(0.50, 0.45, -0.2, 0.1), "dpo-beta20": m(0.52, 0.47, -3.0, 1.0)},
        duels={("hgdpo", "n=2"): {"judge": _rate(0.56, 0.52, 0.60)},
               ("hgdpo", "dpo-public"): {"judge": _rate(0.62, 0.55, 0.70)},
               ("hgdpo", "sft"): {"judge": _rate(0.55, 0.49, 0.61)}})
    found = targets(res)

    def met(start: str):
        return next(t for t in found if t.claim.startswith(start)).met

    assert met("Table 3: N-20 beats N-2") is True
    assert met("Table 3: the judge win rate") is True  # 55% -> 58%
    assert met("Table 5: L-20 beats L-2") is None  # not run
    sml = [t for t in found if t.claim.startswith("Table 2: SML")]
    # DDPM step: S cut 83%, H cut 80%, judge 2 points from DPO's; sampler step: cuts more but loses 10 points.
    assert [t.met for t in sml] == [True, False]
    assert "S shift cut 83.3%" in sml[0].measured
    assert met("Table 2: beta x20") is True  # cuts 50% < SML's 83% at a lower win rate
    assert met("HG-DPO beats") is True  # lower end 61%
    # Table 1, a target per row: above 50% for the public set, not for SFT (49% low end), unmeasured for (H).
    assert met("Table 1: HG-DPO beats DPO on the public set head") is True
    assert met("Table 1: HG-DPO beats SFT") is False
    assert met("Table 1: HG-DPO beats DPO on the public set's (H)") is None
    assert [t.claim.split(" beats ")[1].split(" head")[0] for t in found[:5]] == [
        "SFT on the pool's winners", "DPO with beta x4", "DPO with beta x20", "DPO on the public set",
        "DPO on the public set's (H) subset"]


def test_the_gradient_ratio_is_probed_after_step_0_and_table_2_shows_the_last_probe(done):
    """At step 0 a new adapter's policy is the reference, so the statistic term's gradient is 0: no probe there.
    Table 2's gradient column is the trial's last probe, where training ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{done['out'].parent / 'mlflow.db'}")
    history = client.get_metric_history(_result(done, "hgdpo")["run_id"], "stat_dpo_grad_ratio")
    assert history and all(h.value > 0 for h in history), [(h.step, h.value) for h in history]
    last = max(history, key=lambda h: h.step).value
    report = (done["out"] / "replication.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| + SML (eq. 8, DDPM step)"))
    assert row.endswith(f"| {last:.3g} | `hgdpo` |")
