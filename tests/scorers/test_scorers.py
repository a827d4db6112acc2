"""The evaluation's scorers, on tiny real models this file builds and saves in the real formats.

Each scorer is loaded through ``load_scorer`` from files as users have them (a transformers CLIP
folder, the LAION aesthetic MLP's state dict, an HPSv2-format open_clip checkpoint) and checked
against a direct computation or a hand-computed value; bad input is refused by ``check_scorer``
with the field named.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.models import embedded
from hgdpo.scorers.registry import (
    SCORER_NAMES,
    ScorerSpec,
    check_prompts,
    check_scorer,
    load_scorer,
)
from hgdpo.world.mutate import mutate_caption
from hgdpo.world.prompts import make_prompts
from hgdpo.world.render import render_captions
from hgdpo.world.scene import BACKGROUND

N_PROMPTS = 20


@pytest.fixture(scope="module")
def world():
    """20 held-out captions of the miniature world and a true render of each (64x64)."""
    captions = make_prompts(N_PROMPTS, split="test", seed=3)
    images, _ = render_captions(captions, seed=3)
    return captions, images


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel (real CLIP vocabulary, 16-d embeddings) saved with its processor."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=embedded.IMAGE_SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = tmp_path_factory.mktemp("tiny-clip")
    embedded.save_scorer(path, clip)
    return path


def _direct_clip(folder, captions, images):
    """(image embeddings, text embeddings) of a CLIP folder, computed here without hgdpo.scorers.registry."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = proc(images=list(images), return_tensors="pt")["pixel_values"]
        ids = proc(text=captions, padding=True, return_tensors="pt")
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output
        text_emb = model.get_text_features(input_ids=ids["input_ids"],
                                           attention_mask=ids["attention_mask"]).pooler_output
    return image_emb.double().numpy(), text_emb.double().numpy()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# judge and the world's PickScore


def test_judge_prefers_a_render_of_its_caption_to_a_blank_image(world):
    captions, images = world
    blank = np.broadcast_to(np.array(BACKGROUND, np.uint8), images.shape).copy()
    spec = ScorerSpec("judge")
    check_scorer(spec)
    check_prompts(spec, captions)
    judge = load_scorer(spec)
    true, empty = judge(captions, images), judge(captions, blank)
    assert true.shape == (N_PROMPTS,) and true.dtype == np.float64
    assert np.all(true > empty)
    assert np.all(empty < 0.1) and np.mean(true) > 0.9


def test_judge_names_the_first_prompt_it_cannot_read(world):
    captions, _ = world
    with pytest.raises(HgdpoError, match=r"judge.*prompt 2 \('a photo of an astronaut'\)"):
        check_prompts(ScorerSpec("judge"), [captions[0], "a photo of an astronaut", "neither"])
    check_prompts(ScorerSpec("clip"), ["a photo of an astronaut"])  # only the judge reads the grammar


def test_embedded_pickscore_prefers_the_caption_to_a_one_word_change(world):
    from hgdpo.models import loading as models
    from hgdpo.scorers import pickscore as scoring

    captions, images = world
    rng = np.random.default_rng(0)
    mutated = [mutate_caption(c, rng) for c in captions]
    wrong, _ = render_captions(mutated, seed=3)
    spec = ScorerSpec("pickscore")
    check_scorer(spec)
    scorer = load_scorer(spec)
    scores = scorer(captions + captions, np.concatenate([images, wrong]))  # two images per prompt, interleaved
    assert scores.shape == (2 * N_PROMPTS,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    wins = int(np.sum(scores[:N_PROMPTS] > scores[N_PROMPTS:]))
    assert wins >= 15, f"the world's PickScore preferred the true render on only {wins}/{N_PROMPTS} prompts"
    # Grouping by prompt changes nothing: the same as scoring each prompt's two images directly.
    proc, model = models.load_scorer("embedded")
    for i in (0, 7):
        direct = scoring.pickscore(proc, model, captions[i], np.stack([images[i], wrong[i]]))
        np.testing.assert_allclose(scores[[i, N_PROMPTS + i]], direct, rtol=1e-5)
    np.testing.assert_array_equal(scorer(captions + captions, np.concatenate([images, wrong])), scores)


# ---------------------------------------------------------------------------------------------
# CLIP score


@pytest.mark.parametrize("which", ["embedded", "tiny"])
def test_clip_score_is_100_times_the_clipped_cosine(world, tiny_clip_dir, which):
    captions, images = world
    folder = embedded.scorer_dir() if which == "embedded" else tiny_clip_dir
    spec = ScorerSpec("clip") if which == "embedded" else ScorerSpec("clip", model=str(tiny_clip_dir))
    check_scorer(spec)
    scores = load_scorer(spec)(captions[:6], images[:6])
    image_emb, text_emb = _direct_clip(folder, captions[:6], images[:6])
    cos = np.sum(_unit(image_emb) * _unit(text_emb), axis=-1)
    assert scores.shape == (6,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-4)
    if which == "embedded":  # the world's trained CLIP agrees with its captions
        assert np.all(scores > 50)


# ---------------------------------------------------------------------------------------------
# LAION aesthetic predictor


def _aesthetic_state(width: int, first_row: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The released MLP's keys and shapes (Linear at nn.Sequential indices 0, 2, 4, 6, 7), with known
    weights: only unit 0 of each layer is used, so the output is
    ``2 * (<first_row, e> + 0.5) + 5`` for the normalised embedding ``e``."""
    sizes = [(1024, width), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = {}
    for index, (out, inp) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{index}.weight"] = torch.zeros(out, inp)
        state[f"layers.{index}.bias"] = torch.zeros(out)
    if first_row is not None:
        state["layers.0.weight"][0] = torch.as_tensor(first_row, dtype=torch.float32)
    state["layers.2.weight"][0, 0] = 1.0
    state["layers.2.bias"][0] = 0.5
    state["layers.4.weight"][0, 0] = 1.0
    state["layers.6.weight"][0, 0] = 1.0
    state["layers.7.weight"][0, 0] = 2.0
    state["layers.7.bias"][0] = 5.0
    return state


def test_aesthetic_mlp_with_known_weights_gives_the_hand_computed_value(world, tiny_clip_dir, tmp_path):
    captions, images = world
    image_emb, _ = _direct_clip(tiny_clip_dir, captions[:4], images[:4])
    e = _unit(image_emb)  # (4, 16): the MLP reads L2-normalised embeddings
    state = _aesthetic_state(16, first_row=e[0])
    weights = tmp_path / "aesthetic.safetensors"
    save_file(state, str(weights))
    spec = ScorerSpec("aesthetic", model=str(weights), processor=str(tiny_clip_dir))
    check_scorer(spec)
    scores = load_scorer(spec)(captions[:4], images[:4])
    # Image 0: <e0, e0> = 1, so 2 * (1 + 0.5) + 5 = 8. Others: 2 * (<e0, ej> + 0.5) + 5.
    assert scores[0] == pytest.approx(8.0, abs=1e-5)
    np.testing.assert_allclose(scores, 2 * (e @ e[0] + 0.5) + 5, atol=1e-5)

    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"  # the released file is a pickled state dict
    torch.save(state, pth)
    pickled = ScorerSpec("aesthetic", model=str(pth), processor=str(tiny_clip_dir))
    with pytest.raises(HgdpoError, match=r"scorer 'aesthetic', model: .*pickle.*allow_pickle=true"):
        check_scorer(pickled)
    with pytest.raises(HgdpoError, match="allow_pickle=true"):
        load_scorer(pickled)
    check_scorer(pickled, allow_pickle=True)
    np.testing.assert_allclose(load_scorer(pickled, allow_pickle=True)(captions[:4], images[:4]), scores, atol=1e-6)


def test_aesthetic_refuses_an_mlp_of_another_width_or_another_file(tiny_clip_dir, tmp_path):
    real_size = tmp_path / "l14.safetensors"
    save_file(_aesthetic_state(768), str(real_size))  # what the released ViT-L/14 MLP looks like
    with pytest.raises(HgdpoError, match=r"scorer 'aesthetic', processor: .*16-d.*768-d"):
        check_scorer(ScorerSpec("aesthetic", model=str(real_size), processor=str(tiny_clip_dir)))
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(HgdpoError, match=r"scorer 'aesthetic', model: .*not the LAION aesthetic MLP"):
        check_scorer(ScorerSpec("aesthetic", model=str(other), processor=str(tiny_clip_dir)))
    with pytest.raises(HgdpoError, match=r"scorer 'aesthetic', model: required"):
        check_scorer(ScorerSpec("aesthetic", processor=str(tiny_clip_dir)))


# ---------------------------------------------------------------------------------------------
# HPSv2


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """An open_clip CLIP shaped like ViT-H-14 (same config keys, tiny widths) saved as HPSv2 ships it:
    a torch file holding ``{"state_dict": ...}``; also its state dict as .safetensors."""
    import open_clip

    root = tmp_path_factory.mktemp("hps")
    config = root / "ViT-H-14-tiny.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14-tiny", pretrained=None).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, root / "HPS_v2_compressed.pt")
    save_file(state, str(root / "hps.safetensors"))
    return root, config, model


def test_hpsv2_score_is_the_cosine_hpsv2_returns(world, tiny_hps):
    import open_clip

    captions, images = world
    root, config, model = tiny_hps
    spec = ScorerSpec("hpsv2", model=str(root / "HPS_v2_compressed.pt"), processor=str(config))
    check_scorer(spec, allow_pickle=True)
    scores = load_scorer(spec, allow_pickle=True)(captions[:6], images[:6])
    # Directly: open_clip's own transform (for square images the same as HPSv2's pad-to-square), the
    # model's forward (normalised features), and the diagonal of image_features @ text_features.T.
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14-tiny", pretrained=None)
    from PIL import Image

    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images[:6]])
        image_f, text_f, _ = model(pixels, open_clip.get_tokenizer("ViT-H-14-tiny")(captions[:6]))
    direct = torch.diagonal(image_f @ text_f.T).double().numpy()
    assert scores.shape == (6,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, direct, atol=1e-5)
    assert np.all(np.abs(scores) <= 1)

    from_safetensors = load_scorer(ScorerSpec("hpsv2", model=str(root / "hps.safetensors"), processor=str(config)))
    np.testing.assert_allclose(from_safetensors(captions[:6], images[:6]), scores, atol=1e-6)


def test_hpsv2_refuses_pickle_without_opt_in_and_the_wrong_architecture(tiny_hps):
    root, config, _ = tiny_hps
    pt = str(root / "HPS_v2_compressed.pt")
    with pytest.raises(HgdpoError, match=r"scorer 'hpsv2', model: .*pickle.*allow_pickle=true"):
        check_scorer(ScorerSpec("hpsv2", model=pt, processor=str(config)))
    with pytest.raises(HgdpoError, match=r"scorer 'hpsv2', model: .*does not fit architecture 'ViT-H-14'"):
        check_scorer(ScorerSpec("hpsv2", model=pt), allow_pickle=True)  # default: the real ViT-H-14
    with pytest.raises(HgdpoError, match=r"scorer 'hpsv2', processor: 'ViT-Q-99' is not an open_clip architecture"):
        check_scorer(ScorerSpec("hpsv2", model=pt, processor="ViT-Q-99"), allow_pickle=True)
    with pytest.raises(HgdpoError, match=r"scorer 'hpsv2', model: .* is a folder"):
        check_scorer(ScorerSpec("hpsv2", model=str(root), processor=str(config)))


# ---------------------------------------------------------------------------------------------
# Bad input, refused before any work


@pytest.mark.parametrize("case, message", [
    ("unknown", r"scorer 'picscore', name: unknown scorer; known: judge"),
    ("missing", r"scorer 'clip', model: .*no-such-model does not exist"),
    ("pipeline_folder", r"scorer 'pickscore', model: .* is not a transformers model folder"),
    ("not_clip", r"scorer 'clip', model: .* holds a 'bert' model, not CLIP"),
    ("processor_folder", r"scorer 'pickscore', processor: .* is not a CLIP processor folder"),
    ("judge_model", r"scorer 'judge', model: .*loads no model"),
    ("ckpt", r"scorer 'hpsv2', model: .*pickle.*allow_pickle=true"),
    ("not_weights", r"scorer 'aesthetic', model: .* is not a weights file"),
])
def test_bad_specs_are_refused_naming_the_field(tmp_path, case, message):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "weights.txt").write_text("")
    spec = {
        "unknown": ScorerSpec("picscore"),
        "missing": ScorerSpec("clip", model=str(tmp_path / "no-such-model")),
        "pipeline_folder": ScorerSpec("pickscore", model=str(embedded.pipeline_dir())),
        "not_clip": ScorerSpec("clip", model=str(tmp_path / "bert")),
        "processor_folder": ScorerSpec("pickscore", processor=str(tmp_path / "empty")),
        "judge_model": ScorerSpec("judge", model="embedded"),
        "ckpt": ScorerSpec("hpsv2", model=str(tmp_path / "model.ckpt")),
        "not_weights": ScorerSpec("aesthetic", model=str(tmp_path / "weights.txt")),
    }[case]
    with pytest.raises(HgdpoError, match=message):
        check_scorer(spec)
    with pytest.raises(HgdpoError, match=message):
        load_scorer(spec)


def test_every_scorer_name_has_a_check_and_a_loader():
    assert SCORER_NAMES == ("judge", "pickscore", "clip", "aesthetic", "hpsv2", "imagereward")
    for name in SCORER_NAMES:
        with pytest.raises(HgdpoError, match=f"scorer '{name}'"):
            check_scorer(ScorerSpec(name, model="/no/such/file.safetensors"))


# ---------------------------------------------------------------------------------------------
# One registry: the pool's ranking and the evaluation's settings


def test_every_registered_scorer_is_named_by_its_class():
    from hgdpo.scorers.registry import SCORERS

    assert tuple(SCORERS) == SCORER_NAMES
    for name, cls in SCORERS.items():
        assert cls.name == name


def test_pickscore_ranks_a_pool_as_the_pickscore_function_does_bit_for_bit(world):
    """The pool's ranking scores (float32) are exactly ``pickscore(...)``'s, batch for batch."""
    from hgdpo.models import loading as models
    from hgdpo.scorers import pickscore as scoring

    captions, images = world
    scorer = load_scorer(ScorerSpec("pickscore"))
    proc, model = models.load_scorer("embedded")
    for batch in (None, 3):
        got = scorer.rank_scores(captions[0], images[:7], batch=batch)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, scoring.pickscore(proc, model, captions[0], images[:7], batch=batch))


def test_the_evaluation_settings_of_the_scorers_come_from_the_registry():
    import dataclasses

    from hgdpo.evaluate.config import EvalConfig
    from hgdpo.scorers.registry import SCORERS
    from hgdpo.sweep.config import EVAL_PATHS

    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    keys = {"pickscore": ("pickscore_model", "pickscore_processor"), "clip": ("clip_model", None),
            "aesthetic": ("aesthetic_model", "aesthetic_clip"), "hpsv2": ("hpsv2_model", "hpsv2_architecture"),
            "imagereward": ("imagereward_model", None), "judge": (None, None)}  # the YAML keys users write
    cfg = EvalConfig(prompts="p.txt", output="out")
    for name, cls in SCORERS.items():
        settings = (cls.model_setting, cls.processor_setting)
        assert tuple(s.key if s else None for s in settings) == keys[name]
        for setting, default in zip(settings, (cls.default_model, cls.default_processor)):
            if setting is not None:
                assert fields[setting.key].default == default and fields[setting.key].metadata["doc"] == setting.doc
        assert cfg.scorer_sources(name) == tuple(getattr(cfg, k) if k else None for k in keys[name])
    assert set(EVAL_PATHS) == {"prompts", "baseline_adapter", "pickscore_model", "pickscore_processor", "clip_model",
                               "aesthetic_model", "aesthetic_clip", "hpsv2_model", "imagereward_model"}
    with pytest.raises(ConfigError, match=r"evaluate\.aesthetic_model: required by scorer 'aesthetic'"):
        EvalConfig(prompts="p.txt", output="out", scorers=["aesthetic"])
