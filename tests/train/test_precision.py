"""The trainer's micro-step and precision on CPU: the loss scaler's skip-or-stop decision, its state in
checkpoints, frozen weights in a lower dtype with LoRA in float32, gradient checkpointing, eq. 8's sampler
step (``stat_step``) and the gradient-norm probe.

The CUDA paths (bf16/fp16 autocast, ``GradScaler("cuda")``) cannot run without a GPU; their logic is
the same code driven here by CPU equivalents: ``GradScaler("cpu")`` and CPU bf16 autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from hgdpo.infra import devices
from hgdpo.models import loading as models
from hgdpo.models.lora import add_lora
from hgdpo.objectives.focus import Focus
from hgdpo.train import optim
from hgdpo.train import step as train_step
from hgdpo.train.config import TrainConfig

SHAPE = (4, 16, 16)  # the embedded model's latents


def config(**kw) -> TrainConfig:
    return TrainConfig(pool="-", output="-", lora_rank=4, learning_rate=1e-3, **kw)


@pytest.fixture()
def setup():
    """The embedded UNet with LoRA, its AdamW, LR schedule and DDPM scheduler, and a micro-batch."""
    cfg = config()
    unet = models.load_unet("embedded")
    params = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    optimizer = optim.make_optimizer(cfg, params, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_factor(cfg))
    noise_scheduler = DDPMScheduler.from_config(models.scheduler_config("embedded"), clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give it values, so the loss has a non-zero gradient
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    batch = {"emb": torch.randn(2, 77, 32, generator=gen), "lat_w": torch.randn(2, *SHAPE, generator=gen),
             "lat_l": torch.randn(2, *SHAPE, generator=gen), "t": torch.tensor([100, 700]),
             "noise": torch.randn(2, *SHAPE, generator=gen)}
    return cfg, unet, params, optimizer, schedule, noise_scheduler, batch


def backward(cfg, unet, noise_scheduler, batch, scaler=None, autocast=None) -> torch.Tensor:
    loss, _ = train_step.micro_step(cfg, unet, unet, noise_scheduler, batch["emb"], batch["lat_w"], batch["lat_l"],
                                 batch["t"], batch["noise"], autocast or torch.autocast("cpu", enabled=False))
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def unchanged(params, before) -> bool:
    return all(torch.equal(p, b) for p, b in zip(params, before))


def test_with_a_scaler_an_inf_gradient_skips_that_step_halves_the_scale_and_training_carries_on(setup, tmp_path):
    cfg, unet, params, optimizer, schedule, noise_scheduler, batch = setup
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    outcomes = []
    for step in range(4):
        before = snapshot(params)
        backward(cfg, unet, noise_scheduler, batch, scaler)
        if step == 1:  # an overflow in the backward pass, as fp16 gives when the scale is too high
            params[3].grad[0, 0] = float("inf")
        outcome = optim.optimizer_step(optimizer, params, cfg.max_grad_norm, scaler)
        optimizer.zero_grad(set_to_none=True)
        outcomes.append(outcome)
        assert not outcome.diverged
        assert unchanged(params, before) == (step == 1), step  # only the overflowing step leaves the adapter as is
    assert [o.applied for o in outcomes] == [True, False, True, True]
    assert not math.isfinite(outcomes[1].grad_norm) and all(math.isfinite(o.grad_norm) for o in outcomes[2:])
    assert scaler.get_scale() == 2.0**9  # halved once (growth needs 2000 good steps in a row)
    assert scaler.state_dict()["_growth_tracker"] == 2  # the two good steps since the overflow

    # The scaler's state travels in the checkpoint and comes back on resume.
    optim.save_checkpoint(tmp_path, unet, optimizer, schedule, 4, "fp", scaler)
    fresh = models.load_unet("embedded")
    fresh_params = add_lora(fresh, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    fresh_opt = optim.make_optimizer(cfg, fresh_params, torch.device("cpu"))
    fresh_schedule = torch.optim.lr_scheduler.LambdaLR(fresh_opt, optim.lr_factor(cfg))
    restored = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert optim.load_checkpoint(tmp_path, fresh, fresh_opt, fresh_schedule, "fp", restored) == 4
    assert restored.state_dict() == scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(fresh_params, params))

    # ...and the resumed run continues exactly as the uninterrupted one.
    backward(cfg, unet, noise_scheduler, batch, scaler)
    optim.optimizer_step(optimizer, params, cfg.max_grad_norm, scaler)
    backward(cfg, fresh, noise_scheduler, batch, restored)
    optim.optimizer_step(fresh_opt, fresh_params, cfg.max_grad_norm, restored)
    assert all(torch.equal(a, b) for a, b in zip(fresh_params, params))
    assert restored.get_scale() == scaler.get_scale()


def test_without_a_scaler_a_nonfinite_gradient_is_divergence(setup):
    cfg, unet, params, optimizer, _, noise_scheduler, batch = setup
    before = snapshot(params)
    backward(cfg, unet, noise_scheduler, batch)
    params[0].grad[0, 0] = float("nan")
    outcome = optim.optimizer_step(optimizer, params, cfg.max_grad_norm)
    assert outcome.diverged and not outcome.applied and unchanged(params, before)
    optimizer.zero_grad(set_to_none=True)
    backward(cfg, unet, noise_scheduler, batch)
    outcome = optim.optimizer_step(optimizer, params, cfg.max_grad_norm)
    assert outcome.applied and not outcome.diverged and not unchanged(params, before)


def test_a_checkpoint_without_scaler_state_leaves_the_scaler_as_it_starts(setup, tmp_path):
    _, unet, _, optimizer, schedule, _, _ = setup
    optim.save_checkpoint(tmp_path, unet, optimizer, schedule, 3, "fp")  # written in float32 or bf16
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    assert optim.load_checkpoint(tmp_path, unet, optimizer, schedule, "fp", scaler) == 3
    backward_ready = scaler.scale(torch.ones(()))  # the scale is initialised on first use
    assert float(backward_ready) == 2.0**7


def test_on_cpu_training_is_float32_without_a_scaler():
    for setting in ("auto", "fp16", "bf16", "no"):
        prec = optim.precision(config(mixed_precision=setting), torch.device("cpu"))
        assert prec.dtype == torch.float32 and prec.scaler is None
        with prec.autocast():
            assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("gpu, major_minor, dtype", [
    ("V100", (7, 0), torch.float16), ("T4", (7, 5), torch.float16),
    ("A100", (8, 0), torch.bfloat16), ("H100", (9, 0), torch.bfloat16)])
def test_auto_picks_bf16_only_where_the_gpu_has_bf16_tensor_cores(monkeypatch, gpu, major_minor, dtype):
    """On CPU, with the device's capability faked: torch.cuda.is_bf16_supported() says True on V100 and T4
    too (it counts emulation), which must not choose bf16 there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: major_minor)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # as on a V100
    prec = optim.precision(config(mixed_precision="auto"), torch.device("cuda", 0))
    assert prec.dtype == dtype, gpu
    assert (prec.scaler is not None) == (dtype == torch.float16)  # fp16 always with its loss scaler
    assert optim.precision(config(mixed_precision="bf16"), torch.device("cuda", 0)).dtype == torch.bfloat16
    assert optim.precision(config(mixed_precision="fp16"), torch.device("cuda", 0)).dtype == torch.float16
    assert devices.compiles(torch.device("cuda", 0)) and not devices.compiles(torch.device("cpu"))


def test_compile_needs_a_gpu_triton_supports(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))  # a GTX 1080
    monkeypatch.setattr(torch.version, "hip", None)
    assert not devices.compiles(torch.device("cuda", 0))
    assert not devices.has_bf16_tensor_cores(torch.device("cuda", 0))


def test_frozen_weights_in_the_compute_dtype_lora_in_float32(setup):
    """What the GPU path does with bf16/fp16, on CPU with bf16 (CPU autocast supports it)."""
    cfg, unet, params, optimizer, _, noise_scheduler, batch = setup
    lora = {name for name, p in unet.named_parameters() if p.requires_grad}
    optim.hold_frozen_in(unet, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in unet.named_parameters()}
    assert {dtypes[n] for n in lora} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in lora} == {torch.bfloat16}
    before = snapshot(params)
    loss = backward(cfg, unet, noise_scheduler, batch, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert math.isfinite(float(loss.detach()))
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    outcome = optim.optimizer_step(optimizer, params, cfg.max_grad_norm)
    assert outcome.applied and not unchanged(params, before)
    assert {p.dtype for p in params} == {torch.float32}


def test_gradient_checkpointing_is_on_by_default_on_gpu_only_and_changes_no_gradient(setup):
    assert config(gpus_per_worker=1).checkpointing() and not config().checkpointing()
    assert config(gradient_checkpointing=True).checkpointing()
    assert not config(gpus_per_worker=1, gradient_checkpointing=False).checkpointing()
    cfg, unet, params, _, _, noise_scheduler, batch = setup
    plain = backward(cfg, unet, noise_scheduler, batch)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    unet.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())
    recomputed = backward(cfg, unet, noise_scheduler, batch)
    assert torch.equal(plain, recomputed)
    for a, p in zip(grads, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-8)


def predictions(unet, noise_scheduler, batch) -> tuple[torch.Tensor, ...]:
    """The doubled noise and the policy's and reference's predictions on the noisy winners and losers, built
    here as eq. 3 describes them (what ``micro_step`` must match)."""
    noise2, t2, emb2 = torch.cat([batch["noise"]] * 2), torch.cat([batch["t"]] * 2), torch.cat([batch["emb"]] * 2)
    noisy = noise_scheduler.add_noise(torch.cat([batch["lat_w"], batch["lat_l"]]), noise2, t2)
    with torch.no_grad():
        unet.disable_adapters()
        ref = unet(noisy, t2, encoder_hidden_states=emb2).sample
        unet.enable_adapters()
    return noise2, unet(noisy, t2, encoder_hidden_states=emb2).sample, ref


def test_the_probe_measures_the_ratio_of_the_two_terms_gradient_norms_and_changes_no_gradient(setup):
    """``stat_dpo_grad_ratio`` = ||grad(lambda * L_stat)|| / ||grad(L_DPO)|| over the LoRA parameters, here from
    the two terms built directly (eq. 3 and 8); the probe leaves the step's own gradient as it is without it."""
    from hgdpo.objectives import losses, stat_matching

    cfg, unet, params, _, _, noise_scheduler, batch = setup
    m = len(batch["lat_w"])
    noise2, policy, ref = predictions(unet, noise_scheduler, batch)
    pe, re = losses.per_sample_error(noise2, policy), losses.per_sample_error(noise2, ref)
    dpo, _ = losses.dpo_loss(pe[:m], pe[m:], re[:m], re[m:], beta=cfg.beta)
    stat = stat_matching.stat_matching_loss(policy[:m], ref[:m], stat_matching.ddpm_eps_coefficient(noise_scheduler, batch["t"]))

    def norm(loss):
        return torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, params, retain_graph=True)))

    want = float(norm(cfg.stat_weight() * stat) / norm(dpo))
    args = (cfg, unet, unet, noise_scheduler, batch["emb"], batch["lat_w"], batch["lat_l"], batch["t"], batch["noise"])
    loss, stats = train_step.micro_step(*args, torch.autocast("cpu", enabled=False), probe=params)
    loss.backward()
    probed = [p.grad.clone() for p in params]
    assert want > 0 and float(stats["stat_dpo_grad_ratio"]) == pytest.approx(want, rel=1e-4)
    for p in params:
        p.grad = None
    backward(cfg, unet, noise_scheduler, batch)
    assert all(torch.equal(a, p.grad) for a, p in zip(probed, params))


def test_stat_step_sampler_takes_one_ddim_step_of_the_sampling_schedule(setup):
    """With ``stat_step: sampler`` eq. 8's coefficient is that of one DDIM step t -> t - 1000/stat_sampler_steps:
    the statistic-matching term is the DDPM one with each sample's squared coefficient swapped, about 100x at
    50 steps."""
    from hgdpo.objectives import stat_matching

    _, unet, _, _, _, noise_scheduler, batch = setup
    args = (unet, unet, noise_scheduler, batch["emb"], batch["lat_w"], batch["lat_l"], batch["t"], batch["noise"],
            torch.autocast("cpu", enabled=False))
    _, ddpm = train_step.micro_step(config(), *args)
    _, ddim = train_step.micro_step(config(stat_step="sampler", stat_sampler_steps=50), *args)
    prev = batch["t"] - 20
    coef = stat_matching.ddim_eps_coefficient(noise_scheduler, batch["t"], prev)
    assert torch.allclose(train_step.stat_coefficient(config(stat_step="sampler"), noise_scheduler, batch["t"]), coef)
    ratio = coef / stat_matching.ddpm_eps_coefficient(noise_scheduler, batch["t"])
    assert bool((ratio > 8).all())
    assert float(ddim["dpo"]) == float(ddpm["dpo"])  # the DPO term does not depend on it
    # one sample per call isolates each coefficient: the term scales by its square
    for i in range(2):
        one = (unet, unet, noise_scheduler, batch["emb"][i:i + 1], batch["lat_w"][i:i + 1], batch["lat_l"][i:i + 1],
               batch["t"][i:i + 1], batch["noise"][i:i + 1], torch.autocast("cpu", enabled=False))
        _, a = train_step.micro_step(config(), *one)
        _, b = train_step.micro_step(config(stat_step="sampler"), *one)
        assert float(b["stat"]) == pytest.approx(float(a["stat"]) * float(ratio[i]) ** 2, rel=1e-4)


def test_bad_stat_step_settings_are_refused():
    from hgdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="train.stat_sampler_steps: must be at least 1"):
        config(stat_sampler_steps=0)
    with pytest.raises(ConfigError, match="probe_every"):
        config(probe_every=-1)


def test_the_focus_objective_is_dpo_on_errors_weighted_by_the_pairs_focus_map(setup):
    """``objective: focus``: eq. 3 with each error weighted by ``focus.focus_weight`` of its pair (the same map for
    winner and loser, policy and reference); with every focus term off it is exactly ``dpo``."""
    from hgdpo.objectives import losses
    from hgdpo.objectives.focus import focus_weight

    _, unet, _, _, _, noise_scheduler, batch = setup
    args = (unet, unet, noise_scheduler, batch["emb"], batch["lat_w"], batch["lat_l"], batch["t"], batch["noise"])
    cfg = config(objective="focus", focus_alpha_d=2.0)
    loss, stats = train_step.micro_step(cfg, *args, torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        noise2, policy, ref = predictions(unet, noise_scheduler, batch)
    weight = focus_weight(batch["lat_w"], batch["lat_l"], batch["t"], ref[:2], batch["noise"], Focus(cfg).settings())
    assert float(weight.max()) > 1.2  # the pair's map is not flat
    w2 = torch.cat([weight, weight])
    pe, re = losses.weighted_per_sample_error(noise2, policy, w2), losses.weighted_per_sample_error(noise2, ref, w2)
    want, _ = losses.dpo_loss(pe[:2], pe[2:], re[:2], re[2:], beta=cfg.beta)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5) and "stat" not in stats
    off = config(objective="focus", focus_alpha_d=0.0, focus_alpha_c=0.0, focus_gamma_c=0.0)
    flat, _ = train_step.micro_step(off, *args, torch.autocast("cpu", enabled=False))
    dpo, _ = train_step.micro_step(config(objective="dpo"), *args, torch.autocast("cpu", enabled=False))
    assert torch.equal(flat, dpo) and not torch.equal(loss, dpo)


@pytest.mark.parametrize("field, value, message", [
    ("focus_alpha_d", -1.0, "train.focus_alpha_d: must be >= 0"),
    ("focus_t_lo", 700, "train.focus_t_lo: must be between 0 and focus_t_hi=600"),
])
def test_bad_focus_settings_are_refused_naming_the_setting(field, value, message):
    from hgdpo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(objective="focus", **{field: value})
