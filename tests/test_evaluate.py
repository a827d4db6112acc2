"""The evaluation job on the embedded default: pairing by seed, win rates, files, MLflow, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hgdpo import lan, lora, models
from hgdpo.pool import png_image
from hgdpo.sampling import image_seeds, set_sampler
from hgdpo.world.judge import judge_batch
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import evaluate as evaluate_job  # noqa: E402

FAST = ["images_per_prompt=2", "steps=4", "bootstrap=200", "picture_prompts=2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    write_prompts(tmp / "test.txt", 4, split="test", seed=5)
    return tmp


@pytest.fixture(scope="module")
def adapter(work) -> Path:
    """An adapter of the embedded model whose LoRA visibly changes the images (B perturbed from zero)."""
    pipe = models.load_pipeline("embedded")
    lora.add_lora(pipe.unet, rank=4, alpha=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    base = {"name": "embedded", "fingerprint": models.fingerprint(models.resolve_model("embedded"))}
    return lora.save_adapter(pipe.unet, work / "adapter", 4, 4, info={"fingerprint": "t", "base_model": base})


def run(work: Path, name: str, *extra: str) -> int:
    return evaluate_job.main([f"prompts={work / 'test.txt'}", f"output={work / name}", *FAST,
                              f"mlflow_uri=sqlite:///{work / 'mlflow.db'}", *extra])


@pytest.fixture(scope="module")
def a_vs_base(ray_local, work, adapter):
    assert run(work, "ab", f"adapter={adapter}", "alpha=1.0") == 0
    return work / "ab"


def test_the_same_model_on_both_sides_ties_everywhere(ray_local, work, capsys):
    assert run(work, "same") == 0
    report = json.loads((work / "same" / "report.json").read_text())["result"]
    for name in ("judge", "pickscore"):
        wr = report["win_rates"][name]
        assert (wr["rate"], wr["low"], wr["high"], wr["ties"]) == (0.5, 0.5, 0.5, 8)
    assert report["hsv_change"] == [0.0, 0.0, 0.0]
    assert "| judge | 50.0% | [50.0, 50.0]" in capsys.readouterr().out


def test_rows_hold_the_images_of_each_side_from_the_shared_seeds(work, a_vs_base, adapter):
    table = pq.read_table(a_vs_base / "scores.parquet").to_pylist()
    assert len(table) == 8 and [r["k"] for r in table[:2]] == [0, 1]
    row = table[3]  # prompt 1, seed 1
    seeds = image_seeds(0, row["prompt_id"], 2)
    assert row["seed"] == seeds[1]
    pipe = models.load_pipeline("embedded")
    set_sampler(pipe, "dpm_multistep")
    lan.load_adapter(pipe, adapter, "embedded")
    _, mine_a = lan.sample(pipe, row["prompt"], seeds, steps=4, guidance_scale=5.0, width=64, height=64, alpha=1.0)
    _, mine_b = lan.sample(pipe, row["prompt"], seeds, steps=4, guidance_scale=5.0, width=64, height=64, alpha=None)
    image_a, image_b = png_image(row["image_a"]), png_image(row["image_b"])
    assert np.abs(image_a.astype(int) - mine_a[1]).max() <= 1 and np.abs(image_b.astype(int) - mine_b[1]).max() <= 1
    assert not np.array_equal(image_a, image_b)  # the adapter changed the image
    assert row["score_a_judge"] == pytest.approx(judge_batch(image_a[None], [row["prompt"]])[0])
    assert row["score_b_judge"] == pytest.approx(judge_batch(image_b[None], [row["prompt"]])[0])


def test_report_figures_follow_from_the_scores(work, a_vs_base):
    rows = pq.read_table(a_vs_base / "scores.parquet").to_pylist()
    report = json.loads((a_vs_base / "report.json").read_text())
    result = report["result"]
    for name in ("judge", "pickscore"):
        a = np.array([r[f"score_a_{name}"] for r in rows])
        b = np.array([r[f"score_b_{name}"] for r in rows])
        expected = np.mean(np.where(a > b, 1, np.where(a == b, 0.5, 0)))
        assert result["win_rates"][name]["rate"] == pytest.approx(expected)
        assert result["mean_scores"][name] == pytest.approx({"a": a.mean(), "b": b.mean()})
    hsv_a = np.array([[r["h_a"], r["s_a"], r["v_a"]] for r in rows]).mean(0)
    hsv_b = np.array([[r["h_b"], r["s_b"], r["v_b"]] for r in rows]).mean(0)
    np.testing.assert_allclose(result["hsv_change"], 100 * (hsv_a - hsv_b) / hsv_b)
    assert report["config"]["adapter"].endswith("adapter") and report["versions"]["ray"]
    assert (a_vs_base / "side_by_side.png").stat().st_size > 1000
    assert "| colour | H | S | V |" in (a_vs_base / "table.md").read_text()


def test_the_world_object_report_of_both_sides_follows_from_their_images(work, a_vs_base):
    """With the judge among the scorers, the report holds the world's object-level rates of A and B and their
    paired difference, recomputed here from the stored images."""
    from hgdpo.world.objects import object_report

    rows = pq.read_table(a_vs_base / "scores.parquet").to_pylist()
    result = json.loads((a_vs_base / "report.json").read_text())["result"]
    objects = result["objects"]
    for side in ("a", "b"):
        reports = [object_report(png_image(r[f"image_{side}"]), r["prompt"]) for r in rows]
        colour = sum(x.colour_ok for x in reports) / sum(x.objects for x in reports)
        leaks = sum(x.leaks for x in reports) / sum(x.objects for x in reports)
        assert objects[f"object_colour_acc_{side}"] == pytest.approx(colour)
        assert objects[f"leakage_{side}"] == pytest.approx(leaks)
        assert objects[f"object_colour_acc_{side}_low"] <= colour <= objects[f"object_colour_acc_{side}_high"]
    assert objects["object_colour_acc_diff"] == pytest.approx(objects["object_colour_acc_a"] -
                                                              objects["object_colour_acc_b"])
    assert "| colour right |" in (a_vs_base / "table.md").read_text()
    assert result["metrics"]["object_shape_acc_a"] == objects["object_shape_acc_a"]


def test_swapping_sides_mirrors_the_win_rates(work, a_vs_base, adapter):
    assert run(work, "ba", f"baseline_adapter={adapter}", "baseline_alpha=1.0") == 0
    ab = json.loads((a_vs_base / "report.json").read_text())["result"]["win_rates"]
    ba = json.loads((work / "ba" / "report.json").read_text())["result"]["win_rates"]
    for name in ab:
        assert ab[name]["rate"] + ba[name]["rate"] == pytest.approx(1.0)
        assert (ab[name]["wins"], ab[name]["losses"]) == (ba[name]["losses"], ba[name]["wins"])


def test_mlflow_holds_the_figures_and_the_files(work, a_vs_base):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hgdpo-evaluate")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("output") == str(a_vs_base)]
    assert len(runs) == 1
    report = json.loads((a_vs_base / "report.json").read_text())["result"]
    metrics = runs[0].data.metrics
    assert metrics["win_rate_judge"] == pytest.approx(report["win_rates"]["judge"]["rate"])
    assert {"win_rate_pickscore_low", "win_rate_pickscore_high", "h_change_pct", "mean_a_judge"} <= set(metrics)
    assert runs[0].data.params["alpha"] == "1.0"
    files = {f.path for f in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert files == {"evaluation/report.json", "evaluation/table.md", "evaluation/side_by_side.png"}


def test_rerun_does_nothing_and_other_settings_are_refused(work, a_vs_base, adapter, capsys):
    before = (a_vs_base / "report.json").stat().st_mtime_ns
    assert run(work, "ab", f"adapter={adapter}", "alpha=1.0") == 0
    assert "already holds this evaluation" in capsys.readouterr().out
    assert (a_vs_base / "report.json").stat().st_mtime_ns == before
    assert run(work, "ab", f"adapter={adapter}", "alpha=0.5") == 2
    assert "other settings (alpha)" in capsys.readouterr().err


def test_baseline_rows_made_once_give_the_evaluation_that_makes_both_sides(ray_local, work, a_vs_base, adapter):
    """B's rows made alone into a cache, then read by an evaluation that makes only A's images, give the
    scores file (every score, colour and both images) and the figures of the evaluation that made both."""
    import mlflow

    from hgdpo import evaluate as evaluation
    from hgdpo.config import from_dict, to_dict
    from hgdpo.eval_config import EvalConfig

    cfg = from_dict(EvalConfig, {"prompts": str(work / "test.txt"), "output": str(work / "cached"),
                                 "adapter": str(adapter), "alpha": 1.0, "images_per_prompt": 2, "steps": 4,
                                 "bootstrap": 200, "picture_prompts": 2, "mlflow_uri": f"sqlite:///{work / 'mlflow.db'}"})
    items = evaluation.prepare(cfg)
    cache = str(work / "baselines")
    location, made = evaluation.build_baseline(cfg, items, cache)
    assert made == 8 and evaluation.build_baseline(cfg, items, cache) == (location, 0)  # made once
    result = evaluation.evaluate(cfg, baseline_cache=cache)
    assert result.baseline_cache == location and result.generated == {"a": 8, "b": 0}
    assert pq.read_table(work / "cached" / "scores.parquet").to_pylist() == \
        pq.read_table(a_vs_base / "scores.parquet").to_pylist()
    whole = json.loads((a_vs_base / "report.json").read_text())["result"]["metrics"]
    assert whole["generated_images_b"] == 8
    assert {k: v for k, v in result.metrics().items() if not k.startswith("generated_")} == \
        {k: v for k, v in whole.items() if not k.startswith("generated_")}
    assert f"images and scores read from {location}" in (work / "cached" / "table.md").read_text()
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow_uri)
    exp = client.get_experiment_by_name("hgdpo-evaluate")
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("output") == cfg.output)
    assert run.data.tags["baseline_cache"] == location and run.data.metrics["generated_images_b"] == 0
    # Other sampling settings are another B: not in the cache.
    other = from_dict(EvalConfig, {**to_dict(cfg), "steps": 3})
    assert evaluation.read_baseline(cache, other, items) is None


def _other_base_adapter(tmp: Path) -> Path:
    pipe = models.load_pipeline("embedded")
    lora.add_lora(pipe.unet, rank=2, alpha=2, seed=0)
    return lora.save_adapter(pipe.unet, tmp / "other", 2, 2,
                             info={"fingerprint": "o", "base_model": {"name": "x", "fingerprint": "0" * 16}})


@pytest.mark.parametrize("case, message", [
    ("not_adapter", "adapter: adapter:"), ("other_base", "was trained on base model"),
    ("bad_scorer", "pickscore"), ("empty_prompts", "no prompts"), ("judge_foreign", "judge"),
])
def test_bad_input_is_refused_before_any_work(work, tmp_path, capsys, case, message):
    prompts = work / "test.txt"
    extra = []
    if case == "not_adapter":
        (tmp_path / "nothing").mkdir()
        extra = [f"adapter={tmp_path / 'nothing'}"]
    elif case == "other_base":
        extra = [f"adapter={_other_base_adapter(tmp_path)}"]
    elif case == "bad_scorer":
        extra = [f"pickscore_model={tmp_path / 'no-such-scorer'}"]
    elif case == "empty_prompts":
        prompts = tmp_path / "empty.txt"
        prompts.write_text("\n  \n")
    elif case == "judge_foreign":
        prompts = tmp_path / "foreign.txt"
        prompts.write_text("a photo of an astronaut riding a horse\n")
    code = evaluate_job.main([f"prompts={prompts}", f"output={tmp_path / 'out'}", *FAST, *extra, "--no-mlflow"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_partiprompts_people_with_the_real_model_scorers(ray_local, tmp_path, parti_prompts):
    """The paper's test set (PartiPrompts, category People) through the same job, CLIP score and PickScore."""
    code = evaluate_job.main([f"prompts={parti_prompts}", "category=People", "max_prompts=2",
                              f"output={tmp_path / 'parti'}", "scorers=[pickscore,clip]", "images_per_prompt=1",
                              "steps=2", "bootstrap=50", "picture_prompts=1", "--no-mlflow"])
    assert code == 0
    rows = pq.read_table(tmp_path / "parti" / "scores.parquet").to_pylist()
    assert len(rows) == 2 and all(0 <= r["score_a_clip"] <= 100 for r in rows)
    report = json.loads((tmp_path / "parti" / "report.json").read_text())["result"]
    assert report["win_rates"]["clip"]["ties"] == 2  # A and B are the same model here
