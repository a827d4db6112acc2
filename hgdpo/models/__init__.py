"""The user's diffusion model: loading (hub, single file, embedded), the one sampler, LoRA, LAN, kohya export, attention capture."""
