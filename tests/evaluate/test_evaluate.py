"""The evaluation job on the embedded default: pairing by seed, win rates, files, MLflow, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hgdpo.config.core import from_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.scores_file import SCORES, has_scores, read_scores, write_scores
from hgdpo.infra import storage
from hgdpo.models import lan, lora
from hgdpo.models import loading as models
from hgdpo.models.sampling import image_seeds, set_sampler
from hgdpo.pool.store import png_image
from hgdpo.world.judge import judge_batch
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[2]
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
    """8 (prompt, seed) rows, written in parts of 3."""
    assert run(work, "ab", f"adapter={adapter}", "alpha=1.0", "rows_per_part=3") == 0
    return work / "ab"


def scores(folder: Path) -> list[dict]:
    return read_scores(str(folder)).to_pylist()


def test_the_same_model_on_both_sides_ties_everywhere(ray_local, work, capsys):
    assert run(work, "same") == 0
    report = json.loads((work / "same" / "report.json").read_text())["result"]
    for name in ("judge", "pickscore"):
        wr = report["win_rates"][name]
        assert (wr["rate"], wr["low"], wr["high"], wr["ties"]) == (0.5, 0.5, 0.5, 8)
    assert report["hsv_change"] == [0.0, 0.0, 0.0]
    assert "| judge | 50.0% | [50.0, 50.0]" in capsys.readouterr().out


def test_rows_hold_the_images_of_each_side_from_the_shared_seeds(work, a_vs_base, adapter):
    table = scores(a_vs_base)
    assert sorted(p.name for p in (a_vs_base / SCORES).iterdir()) == [
        "_COMPLETE.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(a_vs_base / SCORES / f"part-0000{i}.parquet").num_rows for i in range(3)] == [3, 3, 2]
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
    rows = scores(a_vs_base)
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

    rows = scores(a_vs_base)
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
    assert run(work, "ab", f"adapter={adapter}", "alpha=1.0") == 0  # rows_per_part only splits the files
    assert "already holds this evaluation" in capsys.readouterr().out
    assert (a_vs_base / "report.json").stat().st_mtime_ns == before
    assert run(work, "ab", f"adapter={adapter}", "alpha=0.5") == 2
    assert "other settings (alpha)" in capsys.readouterr().err


def test_baseline_rows_made_once_give_the_evaluation_that_makes_both_sides(ray_local, work, a_vs_base, adapter):
    """B's rows made alone into a cache, then read by an evaluation that makes only A's images, give the
    scores file (every score, colour and both images) and the figures of the evaluation that made both."""
    import mlflow

    from hgdpo.config.core import from_dict, to_dict
    from hgdpo.evaluate import baseline
    from hgdpo.evaluate import evaluate as evaluation
    from hgdpo.evaluate.config import EvalConfig

    cfg = from_dict(EvalConfig, {"prompts": str(work / "test.txt"), "output": str(work / "cached"),
                                 "adapter": str(adapter), "alpha": 1.0, "images_per_prompt": 2, "steps": 4,
                                 "bootstrap": 200, "picture_prompts": 2, "mlflow_uri": f"sqlite:///{work / 'mlflow.db'}"})
    items = evaluation.prepare(cfg)
    cache = str(work / "baselines")
    location, made = baseline.build_baseline(cfg, items, cache)
    assert made == 8 and baseline.build_baseline(cfg, items, cache) == (location, 0)  # made once
    result = evaluation.evaluate(cfg, baseline_cache=cache)
    assert result.baseline_cache == location and result.generated == {"a": 8, "b": 0}
    assert scores(work / "cached") == scores(a_vs_base)  # one part of 8 rows here, three there
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
    assert baseline.read_baseline(cache, other, items) is None


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
    rows = scores(tmp_path / "parti")
    assert len(rows) == 2 and all(0 <= r["score_a_clip"] <= 100 for r in rows)
    report = json.loads((tmp_path / "parti" / "report.json").read_text())["result"]
    assert report["win_rates"]["clip"]["ties"] == 2  # A and B are the same model here


# --- The scores in parts: no file over the bound on one file (hgdpo.infra.storage.MAX_OBJECT_BYTES) ---


WORLD_CAPTIONS = ("a red circle", "a blue square", "a green triangle", "a black square")


def synthetic_rows(prompts: int = 4, seeds: int = 2) -> list[dict]:
    """Rows as ``generate_and_score`` yields them, with 64x64 noise PNGs (~12 kB each, incompressible)."""
    from hgdpo.pool.store import png_bytes

    rng = np.random.default_rng(0)
    rows = []
    for i in range(prompts):
        row = {"prompt_id": f"p{i}", "prompt_index": i, "prompt": WORLD_CAPTIONS[i % len(WORLD_CAPTIONS)],
               "seeds": np.arange(seeds, dtype=np.int64) + 10 * i}
        for side in ("a", "b"):
            row[f"score_{side}_judge"] = rng.random(seeds)
            row[f"hsv_{side}"] = rng.random((seeds, 3))
            row[f"png_{side}"] = [png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(seeds)]
        rows.append(row)
    return rows


def parts_config(output: str, rows_per_part: int) -> EvalConfig:
    return from_dict(EvalConfig, {"prompts": "test.txt", "output": output, "scorers": ["judge"],
                                  "rows_per_part": rows_per_part})


def test_scores_in_parts_on_s3_read_back_as_the_old_single_file_does(s3_env, monkeypatch, tmp_path):
    """With the bound lowered below the whole scores (8 rows of two ~12 kB PNGs), parts of 3 rows are written to
    the bucket and read back through the reader as the one file of an evaluation written before parts."""
    from hgdpo.evaluate.scores_file import _score_parts

    rows = synthetic_rows()
    old = f"s3://hgdpo-test/evaluations/{tmp_path.name}/old"
    (whole,) = _score_parts(parts_config(old, 8), rows)  # every row in one table, as the writer before parts made it
    storage.write_parquet(storage.join(old, SCORES), whole)  # the layout before parts: a single file
    assert storage.is_file(storage.join(old, SCORES)) and has_scores(old)

    monkeypatch.setenv(storage.BOUND_ENV, "100000")
    assert storage.sizes(old)[SCORES] > 100000  # one file of these scores is over the bound
    new = f"s3://hgdpo-test/evaluations/{tmp_path.name}/new"
    write_scores(storage.join(new, SCORES), parts_config(new, 3), rows)
    assert storage.listdir(storage.join(new, SCORES)) == [
        storage.PARTS_MANIFEST, "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert has_scores(new) and read_scores(new).equals(whole) and read_scores(old).equals(whole)
    assert read_scores(new).to_pylist() == read_scores(old).to_pylist()
    assert [r["k"] for r in read_scores(new).to_pylist()] == [0, 1] * 4
    assert read_scores(new, columns=["image_a"]).column("image_a").to_pylist() == [
        png for r in rows for png in r["png_a"]]

    from hgdpo.report.duel import a_scores, hook_reads
    from hgdpo.scorers.judge import JUDGE_REPORT

    assert a_scores(new, ["judge"]).equals(a_scores(old, ["judge"]))
    assert hook_reads(new, JUDGE_REPORT)[0] == hook_reads(old, JUDGE_REPORT)[0]


def test_scores_over_the_bound_fail_naming_the_file_and_leave_nothing_complete(s3_env, monkeypatch, tmp_path):
    """A part over the lowered bound fails before it is moved onto its name; the scores an earlier run left
    complete no longer look complete, and no temporary object is left."""
    rows = synthetic_rows()
    out = f"s3://hgdpo-test/evaluations/{tmp_path.name}"
    monkeypatch.setenv(storage.BOUND_ENV, "100000")
    write_scores(storage.join(out, SCORES), parts_config(out, 3), rows)
    assert has_scores(out)
    with pytest.raises(HgdpoError) as err:
        write_scores(storage.join(out, SCORES), parts_config(out, 8), rows)
    assert str(err.value).startswith(f"{out}/{SCORES}/part-00000.parquet: the file grows past the 97.7 KiB "
                                     f"(100000 bytes) bound on one file")
    assert not has_scores(out)
    with pytest.raises(HgdpoError, match="without _COMPLETE.json: its writer did not finish"):
        read_scores(out)
    keys = s3_env.keys("hgdpo-test", f"evaluations/{tmp_path.name}/")
    assert not [k for k in keys if "/.tmp-" in k] and not [k for k in keys if k.endswith(storage.PARTS_MANIFEST)]
