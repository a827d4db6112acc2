"""Kohya LoRA export (``hgdpo.models.kohya``, ``jobs/export_lora.py``): the file community tools load.

The adapter is made as the trainer saves it (``hgdpo.models.lora.save_adapter``) on the embedded UNet, with
``lora_alpha = 10`` at rank 4 (scale 2.5, not 1) and its B weights perturbed (a fresh LoRA is a
no-op). The exported file is read back by diffusers' ``load_lora_weights``, which converts kohya
files itself: an independent reader of the format.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hgdpo.infra import storage
from hgdpo.models import kohya, lan, lora
from hgdpo.models import loading as models
from hgdpo.models.sampling import sample_latents

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import export_lora  # noqa: E402

RANK, ALPHA = 4, 10
KW = dict(steps=3, guidance_scale=5.0, width=64, height=64)
PROMPT = "a large red circle on the left"
SEEDS = [3, 4]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they save on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    pipe = models.load_pipeline("embedded")
    lora.add_lora(pipe.unet, rank=RANK, alpha=ALPHA, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    base = {"name": "embedded", "fingerprint": models.fingerprint(models.resolve_model("embedded"))}
    return lora.save_adapter(pipe.unet, tmp_path_factory.mktemp("adapter") / "adapter", RANK, ALPHA,
                             info={"fingerprint": "k", "base_model": base, "config": {"lora_alpha": ALPHA}})


@pytest.fixture(scope="module")
def kohya_file(adapter_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kohya") / "hgdpo.safetensors"
    assert export_lora.main([f"adapter={adapter_dir}", "format=kohya", f"output={out}"]) == 0
    return out


def _latents(pipe, adapter: str | None) -> torch.Tensor:
    if adapter is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([adapter])
    return sample_latents(pipe, PROMPT, SEEDS, **KW).float()


def test_kohya_file_gives_the_images_of_the_diffusers_adapter(adapter_dir, kohya_file, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    pipe = models.load_pipeline("embedded")
    pipe.load_lora_weights(str(adapter_dir), adapter_name="diffusers")
    pipe.load_lora_weights(str(kohya_file), adapter_name="kohya")
    # What diffusers' own converter writes: the same weights, but alpha = rank (scale 1 instead of 2.5).
    peft_state = {k.replace("lora.down", "lora_A").replace("lora.up", "lora_B"): v
                  for k, v in _diffusers_state(adapter_dir).items()}
    naive = tmp_path / "naive.safetensors"
    save_file(convert_state_dict_to_kohya(peft_state), str(naive))
    pipe.load_lora_weights(str(naive), adapter_name="naive")

    ours, theirs, naive_l, base = (_latents(pipe, a) for a in ("diffusers", "kohya", "naive", None))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 0.05  # the adapter changes the images ...
    assert (naive_l - ours).abs().max() > 0.02  # ... and so does its scale: alpha = rank would be wrong


def _diffusers_state(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / lora.ADAPTER_FILE))


def test_kohya_file_holds_the_real_alpha_and_kohya_metadata(adapter_dir, kohya_file):
    from diffusers import StableDiffusionPipeline

    with safe_open(str(kohya_file), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    modules = {k.split(".")[0] for k in keys}
    assert len(modules) == 32 and keys == {f"{m}.{p}" for m in modules
                                          for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(a.dtype == torch.float32 and a.shape == () and a.item() == ALPHA for a in alphas.values())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("4", "10", "sd_v1")
    assert json.loads(meta["hgdpo_adapter"])["config"] == {"lora_alpha": ALPHA}
    # diffusers' reader of kohya files finds every layer with its alpha (scale = alpha / rank = 2.5)
    state, alphas_read = StableDiffusionPipeline.lora_state_dict(str(kohya_file))
    assert len(state) == 64 and len(alphas_read) == 32 and set(alphas_read.values()) == {ALPHA}


def test_a_non_integer_alpha_survives_a_float16_export():
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    adapter = kohya.Adapter({"mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (down, up)}, 2, 3.7, {})
    state = kohya.to_kohya(adapter, "float16")
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    assert state[f"{name}.alpha"].item() == torch.tensor(3.7).item()  # float32's 3.7, not float16's 3.69921875
    assert state[f"{name}.lora_down.weight"].dtype == torch.float16
    assert kohya.kohya_metadata(adapter)["ss_network_alpha"] == "3.7"


def _sd15_attention_modules() -> list[tuple[str, int, int]]:
    """(module path, in, out) of every attention projection of SD1.5's UNet, built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD1.5's config: the defaults with 768-d text conditioning
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    return [(name, m.in_features, m.out_features) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0")
            and ".attn" in name]


def test_key_names_are_sd15_module_names_as_kohya_files_spell_them():
    from diffusers import StableDiffusionPipeline

    layers = {name: (torch.zeros(1, fan_in), torch.zeros(fan_out, 1)) for name, fan_in, fan_out in
              _sd15_attention_modules()}
    state = kohya.to_kohya(kohya.Adapter(layers, 1, 1.0, {}))
    names = {k.split(".")[0] for k in state}
    blocks = ([f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
              + [f"up_blocks_{b}_attentions_{a}" for b in (1, 2, 3) for a in range(3)])
    expected = {f"lora_unet_{blk}_transformer_blocks_0_{attn}_{proj}" for blk in blocks
                for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")}
    assert names == expected and len(names) == 128
    # spellings as they appear in SD1.5 LoRA files shared for A1111 / ComfyUI
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"} <= names
    # cross-attention keys read the 768-d text embedding
    assert state["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (1, 768)
    converted, _ = StableDiffusionPipeline.lora_state_dict(state)
    assert len(converted) == 2 * 128 and all(k.startswith("unet.") for k in converted)


def test_diffusers_format_export_is_the_adapter_folder(adapter_dir, tmp_path):
    out = tmp_path / "exported"
    assert export_lora.main([f"adapter={adapter_dir}", f"output={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in adapter_dir.iterdir())
    assert (out / lora.ADAPTER_FILE).read_bytes() == (adapter_dir / lora.ADAPTER_FILE).read_bytes()
    assert lan.check_adapter(out, "embedded")["fingerprint"] == "k"
    assert export_lora.main([f"adapter={adapter_dir}", f"output={out}"]) == 2  # exists: refused ...
    assert export_lora.main([f"adapter={adapter_dir}", f"output={out}", "overwrite=true"]) == 0  # ... unless asked
    assert (out / lora.INFO_FILE).read_bytes() == (adapter_dir / lora.INFO_FILE).read_bytes()


def test_export_to_object_storage(adapter_dir, s3_env):
    uri = "s3://hgdpo-test/loras/dpo.safetensors"
    assert export_lora.main([f"adapter={adapter_dir}", "format=kohya", "dtype=float16", f"output={uri}"]) == 0
    from safetensors.torch import load

    state = load(storage.read_bytes(uri))
    assert len(state) == 96 and state[next(k for k in state if k.endswith("lora_up.weight"))].dtype == torch.float16


@pytest.mark.parametrize("case, message", [
    ("missing", r"adapter: .*nowhere does not exist"),
    ("not_adapter", r"adapter: .* is not an adapter \(no pytorch_lora_weights.safetensors or hgdpo_adapter.json\)"),
    ("no_alpha", r"adapter: .* does not record its rank and lora_alpha"),
    ("text_encoder", r"adapter: .* has key 'text_encoder\..*not a UNet LoRA weight"),
    ("suffix", r"export.output: .* must be a .safetensors file for format=kohya"),
    ("exists", r"export.output: .* exists; choose another output or set overwrite=true"),
    ("format", r"export.format: must be one of 'diffusers' \| 'kohya'"),
])
def test_bad_input_is_refused_naming_it_and_writes_nothing(adapter_dir, tmp_path, capsys, case, message):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / lora.INFO_FILE).write_text("{}")
    out = tmp_path / "out.safetensors"
    adapter = str(adapter_dir)
    if case == "missing":
        adapter = str(tmp_path / "nowhere")
    elif case == "not_adapter":
        (bad / lora.INFO_FILE).unlink()
        adapter = str(bad)
    elif case in ("no_alpha", "text_encoder"):
        state = _diffusers_state(adapter_dir)
        meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": ALPHA})}
        if case == "text_encoder":
            state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight"] = torch.zeros(RANK, 4)
        save_file(state, str(bad / lora.ADAPTER_FILE), metadata=None if case == "no_alpha" else meta)
        adapter = str(bad)
    elif case == "suffix":
        out = tmp_path / "out.bin"
    elif case == "exists":
        out.write_bytes(b"keep me")
    args = [f"adapter={adapter}", f"output={out}", "format=kohya" if case != "format" else "format=a1111"]
    assert export_lora.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad", "out.safetensors"] if case == "exists" else ["bad"])
    if case == "exists":
        assert out.read_bytes() == b"keep me"

