"""Sampling with an adapter: alpha, LAN (eq. 7), adapter checks, and the sample job end to end.

The adapter is made without the trainer: LoRA added to the embedded UNet with its B weights
perturbed (fresh LoRA is a no-op), saved by ``hgdpo.models.lora.save_adapter`` as the trainer saves it.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hgdpo.errors import HgdpoError
from hgdpo.models import lan, lora
from hgdpo.models import loading as models
from hgdpo.models.sampling import generate, image_seeds, set_sampler
from hgdpo.prompts import read_prompts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import sample as sample_job  # noqa: E402

SIZE = dict(width=64, height=64)  # small, and a multiple of any SD-family latent grid
KW = dict(steps=3, guidance_scale=5.0, **SIZE)
SEEDS = [11, 12]
PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they save on a shared machine
    yield
    torch.set_num_threads(threads)


def base_info() -> dict:
    return {"name": "embedded", "fingerprint": models.fingerprint(models.resolve_model("embedded"))}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    pipe = models.load_pipeline("embedded")
    lora.add_lora(pipe.unet, rank=4, alpha=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:  # B starts at zero: perturb it so the adapter changes the model
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    directory = tmp_path_factory.mktemp("adapter")
    return lora.save_adapter(pipe.unet, directory, 4, 4, info={"fingerprint": "x", "base_model": base_info()})


@pytest.fixture(scope="module")
def plain():
    """The base model, never touched by LoRA."""
    return models.load_pipeline("embedded")


@pytest.fixture(scope="module")
def tuned(adapter_dir):
    pipe = models.load_pipeline("embedded")
    lan.load_adapter(pipe, adapter_dir, "embedded")
    return pipe


def channel_stats(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = latents.astype(np.float64)
    return x.mean(axis=(2, 3)), x.std(axis=(2, 3))  # (N, C) each


def test_match_channel_stats_by_hand():
    # channel 0: x = [0, 2, 4] has mean 2, std 2 (n-1); ref = [1, 1, 7] has mean 3, var (4+4+16)/2 = 12.
    #   (x - 2) / 2 * sqrt(12) + 3 = [3 - 2*sqrt(3), 3, 3 + 2*sqrt(3)]
    # channel 1: x = [1, 2, 3] has mean 2, std 1; ref = [0, 0, 3] has mean 1, var (1+1+4)/2 = 3.
    #   (x - 2) * sqrt(3) + 1 = [1 - sqrt(3), 1, 1 + sqrt(3)]
    x = torch.tensor([[[[0.0, 2.0, 4.0]], [[1.0, 2.0, 3.0]]]])  # (1, 2, 1, 3)
    ref = torch.tensor([[[[1.0, 1.0, 7.0]], [[0.0, 0.0, 3.0]]]])
    r3 = math.sqrt(3)
    expected = torch.tensor([[[[3 - 2 * r3, 3.0, 3 + 2 * r3]], [[1 - r3, 1.0, 1 + r3]]]])
    torch.testing.assert_close(lan.match_channel_stats(x, ref), expected)


def test_adapter_loads_into_a_plain_diffusers_pipeline(adapter_dir):
    from diffusers import StableDiffusionPipeline

    from hgdpo.models import embedded

    pipe = StableDiffusionPipeline.from_pretrained(embedded.pipeline_dir(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", **SIZE).images

    before = images()
    pipe.load_lora_weights(adapter_dir)
    after = images()
    assert before.shape == after.shape
    assert not np.array_equal(before, after)


@pytest.mark.parametrize("sampler", ["dpm_multistep", "euler_ancestral"])
def test_explicit_loop_gives_the_pipeline_call_images(plain, tuned, sampler):
    set_sampler(plain, sampler)
    set_sampler(tuned, sampler)
    expected = generate(plain, PROMPT, SEEDS, **KW)
    got = lan.sample(plain, PROMPT, SEEDS, **KW)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    tuned.set_adapters([lan.ADAPTER_NAME], adapter_weights=[0.5])
    expected = generate(tuned, PROMPT, SEEDS, **KW)
    assert np.array_equal(lan.sample(tuned, PROMPT, SEEDS, alpha=0.5, **KW)[1], expected[1])


def test_alpha_and_seeds(plain, tuned):
    set_sampler(plain, "dpm_multistep")
    set_sampler(tuned, "dpm_multistep")
    base = generate(plain, PROMPT, SEEDS, **KW)
    zero = lan.sample(tuned, PROMPT, SEEDS, alpha=0.0, **KW)
    assert np.array_equal(zero[1], base[1]) and np.array_equal(zero[0], base[0])
    assert np.array_equal(lan.sample(tuned, PROMPT, SEEDS, **KW)[1], base[1])  # alpha None: adapter bypassed
    half = lan.sample(tuned, PROMPT, SEEDS, alpha=0.5, **KW)
    again = lan.sample(tuned, PROMPT, SEEDS, alpha=0.5, **KW)
    assert np.array_equal(half[1], again[1]) and np.array_equal(half[0], again[0])
    assert not np.array_equal(half[1], base[1])
    full = lan.sample(tuned, PROMPT, SEEDS, alpha=1.0, **KW)
    assert not np.array_equal(full[1], half[1])
    # One image alone is the one in its batch, up to float rounding (another batch size sums in
    # another order): within 2 of 255 levels.
    alone = lan.sample(tuned, PROMPT, SEEDS[1:], alpha=0.5, **KW)[1][0].astype(int)
    assert np.abs(alone - half[1][1].astype(int)).max() <= 2


@pytest.mark.parametrize("sampler", ["dpm_multistep", "euler_ancestral"])
def test_lan_gives_the_original_models_channel_statistics(plain, tuned, sampler):
    set_sampler(plain, sampler)
    set_sampler(tuned, sampler)
    base = generate(plain, PROMPT, SEEDS, **KW)
    adapted = lan.sample(tuned, PROMPT, SEEDS, alpha=0.5, **KW)
    normalised = lan.sample(tuned, PROMPT, SEEDS, alpha=0.5, lan=True, **KW)
    assert np.array_equal(normalised[1], lan.sample(tuned, PROMPT, SEEDS, alpha=0.5, lan=True, **KW)[1])

    mu_base, sd_base = channel_stats(base[0])
    mu_lan, sd_lan = channel_stats(normalised[0])
    # The latents come as float16 (relative rounding 2**-11); the tolerance scales with the latents.
    tol = 2e-3 * float(np.sqrt(np.mean(base[0].astype(np.float64) ** 2)))
    np.testing.assert_allclose(mu_lan, mu_base, rtol=0, atol=tol)
    np.testing.assert_allclose(sd_lan, sd_base, rtol=0, atol=tol)
    mu_adapted, sd_adapted = channel_stats(adapted[0])
    assert np.abs(mu_adapted - mu_base).max() + np.abs(sd_adapted - sd_base).max() > 5 * tol  # a real change
    assert not np.array_equal(normalised[1], base[1])
    assert not np.array_equal(normalised[1], adapted[1])


def test_lan_needs_an_adapter(plain, tuned):
    with pytest.raises(HgdpoError, match="lan: needs an adapter"):
        lan.sample(tuned, PROMPT, SEEDS, lan=True, **KW)
    with pytest.raises(HgdpoError, match="no adapter is loaded"):
        lan.sample(plain, PROMPT, SEEDS, alpha=0.5, **KW)


def test_adapter_of_another_base_model_is_refused(adapter_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(adapter_dir, other)
    info = json.loads((other / lora.INFO_FILE).read_text())
    info["base_model"] = {"name": "my-portrait-model", "fingerprint": "0123456789abcdef"}
    (other / lora.INFO_FILE).write_text(json.dumps(info))
    ours = base_info()["fingerprint"]
    with pytest.raises(HgdpoError) as err:
        lan.check_adapter(other, "embedded")
    assert "0123456789abcdef" in str(err.value) and ours in str(err.value)
    assert "'my-portrait-model'" in str(err.value)


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(HgdpoError, match="is not an adapter"):
        lan.check_adapter(tmp_path, "embedded")
    with pytest.raises(HgdpoError, match="does not exist"):
        lan.check_adapter(tmp_path / "missing", "embedded")


def test_sample_job_writes_images_and_manifest(tmp_path, adapter_dir, tuned, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPT}\na small blue square on the right\n")
    output = tmp_path / "out"
    argv = [f"prompts={prompts_file}", f"output={output}", f"adapter={adapter_dir}", "lan=true", "alpha=0.5",
            "images_per_prompt=2", "steps=3", "sampler=euler_ancestral", "width=64", "height=64", "seed=7"]
    assert sample_job.main(argv) == 0

    prompts = read_prompts(prompts_file)
    manifest = json.loads((output / "samples.json").read_text())
    assert manifest["config"]["lan"] is True and manifest["config"]["alpha"] == 0.5
    assert manifest["adapter"]["fingerprint"] == "x" and manifest["base_model"] == base_info()
    assert {"python", "torch", "diffusers"} <= set(manifest["versions"])
    expected_files = [{"file": f"{p.id}_{k}.png", "prompt_id": p.id, "prompt": p.text, "k": k, "seed": seed}
                      for p in prompts for k, seed in enumerate(image_seeds(7, p.id, 2))]
    assert manifest["files"] == expected_files
    assert sorted(f.name for f in output.iterdir()) == sorted([e["file"] for e in expected_files] + ["samples.json"])

    set_sampler(tuned, "euler_ancestral")  # the job's images are the library's, pixel for pixel
    _, images = lan.sample(tuned, prompts[1].text, image_seeds(7, prompts[1].id, 2), steps=3, guidance_scale=5.0,
                           alpha=0.5, lan=True, **SIZE)
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(output / f"{prompts[1].id}_{k}.png")), images[k])

    capsys.readouterr()
    assert sample_job.main(argv) == 0  # finished: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert sample_job.main(argv[:-1] + ["seed=8"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_sample_job_reads_its_adapter_from_and_writes_to_object_storage(s3_env, tmp_path, adapter_dir, tuned, capsys):
    """The same job with the adapter and the output in a bucket (an S3-compatible server on 127.0.0.1)."""
    from hgdpo.infra import storage

    root = f"s3://hgdpo-test/sample/{tmp_path.name}"
    storage.copy_tree(str(adapter_dir), f"{root}/adapter", last=lora.INFO_FILE)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPT}\n")
    argv = [f"prompts={prompts_file}", f"output={root}/out", f"adapter={root}/adapter", "alpha=0.5",
            "images_per_prompt=2", "steps=3", "width=64", "height=64", "seed=7"]
    assert sample_job.main(argv) == 0
    (prompt,) = read_prompts(prompts_file)
    manifest = storage.read_json(f"{root}/out/samples.json")
    assert manifest["adapter"]["path"] == f"{root}/adapter" and manifest["adapter"]["fingerprint"] == "x"
    assert storage.listdir(f"{root}/out") == sorted([f"{prompt.id}_0.png", f"{prompt.id}_1.png", "samples.json"])
    set_sampler(tuned, "dpm_multistep")
    _, images = lan.sample(tuned, prompt.text, image_seeds(7, prompt.id, 2), steps=3, guidance_scale=5.0, alpha=0.5,
                           **SIZE)
    png = storage.read_bytes(f"{root}/out/{prompt.id}_1.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), images[1])
    assert not Path("s3:").exists(), "a URI was taken for a local path"


@pytest.mark.parametrize("extra, message", [
    (["lan=true"], "sample.lan: needs an adapter"),
    (["alpha=3"], "sample.alpha: must be between 0 and 2"),
    (["adapter={tmp}"], "is not an adapter"),
])
def test_sample_job_refuses_bad_settings(tmp_path, capsys, extra, message):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPT}\n")
    output = tmp_path / "out"
    argv = [f"prompts={prompts_file}", f"output={output}"] + [e.format(tmp=tmp_path) for e in extra]
    assert sample_job.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not output.exists()
