"""Training objectives: the losses of Diffusion-DPO, HG-DPO, SFT and the region-weighted variants."""
