"""OSPO's objective: Diffusion-DPO on the self-judged pairs of a pool with hard negatives, each image's error
weighted by its object mask.

The pairs (``choose``): per prompt, the seed whose original the model itself judges to show the prompt
against its perturbations while the same seed's image of a perturbed prompt does not
(``hgdpo.pool.ospo.choose_pair``); a prompt without such a seed gives no pair. The weight: OSPO's
``w = 1 + alpha * m^gamma`` from the reference pass's cross-attention to the prompt's nouns
(``hgdpo.objectives.masks.mask_weights``), recorded in the same forward pass (``recording``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from hgdpo.config.core import doc
from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.models.attention import capture, config_resolutions, cross_attention_layers, default_resolution
from hgdpo.objectives.base import PICTURE_TIMESTEPS, Chosen, Predictions, reference_pass
from hgdpo.objectives.dpo import DPO
from hgdpo.objectives.masks import mask_weights
from hgdpo.pool.ospo import choose_pair
from hgdpo.report.pictures import weight_grid


@dataclass(kw_only=True)
class OspoConfig:
    """The ``ospo`` objective's keys of the train config."""

    TRAILING = True  # listed after the trainer's own settings

    ospo_alpha: float = doc("ospo: how much more an object's positions weigh, w = 1 + alpha * m^gamma.", 1.0,
                              minimum=0, resume=True, sweep=True)
    ospo_gamma: float = doc("ospo: exponent gamma of the soft object mask m.", 1.0, above=0, resume=True, sweep=True)
    ospo_margin: float = doc("ospo: the least margin by which the chosen image must answer each question (its "
                             "denoising error under the perturbed prompt minus under the prompt; hgdpo.pool.ospo).",
                             0.0, resume=True, sweep=True)
    ospo_mask_resolutions: list[int] | None = doc(
        "ospo: the cross-attention layers the masks are read from, by resolution (hgdpo.models.attention; SD1.5: 64, "
        "32, 16, 8); default: the one nearest a quarter of the UNet's latent side (SD1.5: 16).", None,
        resume=True, sweep=True)


def _side(config: dict) -> int:
    size = config["sample_size"]
    return size if isinstance(size, int) else size[0]


class OSPO(DPO):
    name = "ospo"
    summary = ("Diffusion-DPO on the self-judged pairs of a pool with hard negatives (hgdpo.pool.ospo), each "
               "error weighted by its image's object mask")
    Settings = OspoConfig
    selection = "ospo"
    pool_columns = ("self_scores", "self_least")
    per_prompt = "at most one"
    needs_nouns = True
    picture_name = "ospo/masks.png"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.ospo_mask_resolutions is not None and not cfg.ospo_mask_resolutions:
            raise ConfigError(f"{cfg.SECTION}.ospo_mask_resolutions: empty; leave it unset for the default")

    def plan_margin(self) -> float:
        return self.cfg.ospo_margin

    def check_pool(self, meta: dict) -> None:
        if not meta["config"].get("hard_negatives"):
            raise HgdpoError(f"train.objective: ospo trains on a pool with hard negatives; {meta['config']['output']} "
                             f"has none (build one with pool.hard_negatives: [replace, swap, drop])")

    def check_model(self, unet_config: dict, model: str) -> None:
        """The mask layers (``ospo_mask_resolutions``, or the default) must exist in the UNet."""
        have = config_resolutions(unet_config)
        for i, r in enumerate(self.cfg.ospo_mask_resolutions or [default_resolution(have, _side(unet_config))]):
            if r not in have:
                raise HgdpoError(f"train.ospo_mask_resolutions[{i}]: the UNet of {model!r} has no cross-attention "
                                 f"layers at resolution {r}; it has {', '.join(map(str, have))}")

    @classmethod
    def choose(cls, small: pa.Table, keep: np.ndarray, pool_size: int, loser_rank: int, margin: float) -> Chosen:
        """The seed of each kept row that the self-judge picks: its original, then its negative."""
        scores, least = small.column("self_scores").to_pylist(), small.column("self_least").to_pylist()
        big_n = len(scores[0]) // 2 if scores else 0
        seeds = [choose_pair(scores[r], least[r], pool_size, margin) for r in keep]
        rows = np.asarray([r for r, j in zip(keep, seeds) if j is not None], dtype=np.int64)
        pairs = [(j, big_n + j) for j in seeds if j is not None]
        return Chosen(rows, pairs, [(scores[r][w], scores[r][l]) for r, (w, l) in zip(rows, pairs)])

    def resolutions(self, unet) -> list[int]:
        if self.cfg.ospo_mask_resolutions:
            return list(self.cfg.ospo_mask_resolutions)
        return [default_resolution(sorted(set(cross_attention_layers(unet).values())), _side(unet.config))]

    def recording(self, unet) -> contextlib.AbstractContextManager:
        return capture(unet, resolutions=self.resolutions(unet))

    def weights(self, maps: torch.Tensor, nouns: list, size: tuple[int, int]) -> torch.Tensor:
        return mask_weights(maps, nouns, size, alpha=self.cfg.ospo_alpha, gamma_m=self.cfg.ospo_gamma)

    def loss(self, pred: Predictions):
        # each image's own mask, from the reference's attention to its prompt's nouns: (2m, 1, h, w)
        weight = self.weights(pred.attention.mean(), pred.nouns + pred.nouns, tuple(pred.lat_w.shape[-2:]))
        return self.pair_loss(pred, *pred.errors(weight))

    def picture(self, unet, noise_scheduler, lat_w, lat_l, emb, noise, nouns, autocast):
        """The winners' and the losers' mask weights at ``PICTURE_TIMESTEPS``, with the pairs' noise of the step."""
        weights, labels = [], []
        for timestep in PICTURE_TIMESTEPS:
            t = torch.full((len(lat_w),), timestep, device=lat_w.device)
            for side, lat in (("winner", lat_w), ("loser", lat_l)):
                with autocast, self.recording(unet) as cap:
                    reference_pass(unet, noise_scheduler.add_noise(lat, noise, t), t, emb)
                weights.append(self.weights(cap.mean(), nouns, tuple(lat.shape[-2:]))[:, 0])  # (m, h, w)
                labels.append(f"W {side[0]} t={timestep}")
        return weight_grid(lat_w.cpu().numpy(), lat_l.cpu().numpy(), torch.stack(weights, dim=1).cpu().numpy(), labels)
