"""An evaluation's result (``EvalResult``): win rates, mean scores, colours and the scorers' reports,
as figures, a short summary and the readable table.

``summarize`` makes it from the rows of every (prompt, seed): per scorer, A's win rate over B with a
bootstrap interval over prompts (``hgdpo.report.winrates``), the mean scores, the mean H, S and V
of each side and A's change against B (paper Tables 1 and 2), and the figures of every report hook
its scorers offer (``hgdpo.scorers.registry.report_hooks``: the judge's object-level rates), read again from
the PNGs, in the driver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.scores_file import SIDES
from hgdpo.infra import storage
from hgdpo.pool.store import png_image
from hgdpo.report.winrates import WinRate, percent_change, win_rate
from hgdpo.scorers.registry import report_hooks


@dataclass
class EvalResult:
    output: str
    prompts: int
    comparisons: int
    seconds: float
    win_rates: dict[str, WinRate] = field(default_factory=dict)
    mean_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # scorer -> side -> mean
    hsv: dict[str, list[float]] = field(default_factory=dict)  # side -> mean (H, S, V)
    hsv_change: list[float] = field(default_factory=list)  # A against B, percent
    objects: dict[str, float] = field(default_factory=dict)  # the scorers' report figures (report_figures)
    generated: dict[str, int] = field(default_factory=dict)  # side -> images this evaluation made of it
    baseline_cache: str | None = None  # where B's images and scores were read from (None: made here)
    skipped: bool = False  # the output already held this evaluation

    def metrics(self) -> dict[str, float]:
        """Flat figures, as MLflow metrics and Ray Tune results name them."""
        out = {"prompts": float(self.prompts), "comparisons": float(self.comparisons)}
        for name, wr in self.win_rates.items():
            out.update({f"win_rate_{name}": wr.rate, f"win_rate_{name}_low": wr.low,
                        f"win_rate_{name}_high": wr.high})
            for side in SIDES:
                out[f"mean_{side}_{name}"] = self.mean_scores[name][side]
        for side in SIDES:
            for channel, value in zip("hsv", self.hsv.get(side, [])):
                out[f"{channel}_{side}"] = value
        for channel, value in zip("hsv", self.hsv_change):
            out[f"{channel}_change_pct"] = value
        for side, images in self.generated.items():
            out[f"generated_images_{side}"] = float(images)
        out.update(self.objects)
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        data["metrics"] = self.metrics()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EvalResult":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["win_rates"] = {k: WinRate(**v) for k, v in data["win_rates"].items()}
        return cls(**data)


def describe_side(cfg: EvalConfig, side: str, cache: str | None = None) -> str:
    """``cache``: where this side's images and scores were read from."""
    s = cfg.side(side)
    text = (f"base model {cfg.model!r}" if s["adapter"] is None
            else f"adapter {s['adapter']} (alpha {s['alpha']:g}{', LAN' if s['lan'] else ''})")
    return text + (f", images and scores read from {cache}" if cache else "")


def summary(cfg: EvalConfig, result: EvalResult) -> str:
    """The short report a whole run ends with: each scorer's win rate, A's colour change, where the full
    report (``table``: means, counts, colours, the world's objects) is."""
    pct = int(round(100 * cfg.confidence))
    lines = [f"A ({describe_side(cfg, 'a')}) against B ({describe_side(cfg, 'b', result.baseline_cache)}), "
             f"{result.comparisons} comparisons on {result.prompts} prompts:"]
    for name, wr in result.win_rates.items():
        lines.append(f"  {name}: A wins {100 * wr.rate:.1f}% ({pct}% interval {100 * wr.low:.1f} to {100 * wr.high:.1f})")
    h, s, v = result.hsv_change
    lines += [f"  A's colours against B's: hue {h:+.2f}%, saturation {s:+.2f}%, value {v:+.2f}%",
              f"the full report: {storage.join(cfg.output, 'table.md')}"]
    return "\n".join(lines)


def table(cfg: EvalConfig, result: EvalResult) -> str:
    """The readable report: win rates per scorer, then the colour table (paper Tables 1 and 2)."""
    pct = int(round(100 * cfg.confidence))
    lines = [f"A: {describe_side(cfg, 'a')}", f"B: {describe_side(cfg, 'b', result.baseline_cache)}",
             f"{result.prompts} prompts x {cfg.images_per_prompt} seed(s) = {result.comparisons} comparisons", "",
             f"| scorer | A wins | {pct}% interval | A mean | B mean | wins / ties / losses |",
             "|---|---|---|---|---|---|"]
    for name, wr in result.win_rates.items():
        m = result.mean_scores[name]
        lines.append(f"| {name} | {100 * wr.rate:.1f}% | [{100 * wr.low:.1f}, {100 * wr.high:.1f}] | "
                     f"{m['a']:.4g} | {m['b']:.4g} | {wr.wins} / {wr.ties} / {wr.losses} |")
    lines += ["", "| colour | H | S | V |", "|---|---|---|---|"]
    for side in SIDES:
        h, s, v = result.hsv[side]
        lines.append(f"| {side.upper()} | {h:.4f} | {s:.4f} | {v:.4f} |")
    h, s, v = result.hsv_change
    lines.append(f"| A vs B | {h:+.2f}% | {s:+.2f}% | {v:+.2f}% |")
    for hook in report_hooks(cfg.scorers):
        o, rates = result.objects, [(rate, label) for rate, label in hook.rates if f"{rate}_a" in result.objects]
        if not rates:
            continue
        lines += ["", f"| {hook.kind} ({hook.source}) | A | B | A - B [{pct}% interval] |", "|---|---|---|---|"]
        for rate, label in rates:
            lines.append(f"| {label} | {100 * o[f'{rate}_a']:.1f}% | {100 * o[f'{rate}_b']:.1f}% | "
                         f"{100 * o[f'{rate}_diff']:+.1f} [{100 * o[f'{rate}_diff_low']:+.1f}, "
                         f"{100 * o[f'{rate}_diff_high']:+.1f}] |")
    return "\n".join(lines)


def summarize(cfg: EvalConfig, rows: list[dict]) -> EvalResult:
    """Win rates per scorer, mean scores, colours and report figures from the rows of every (prompt, seed)."""
    groups = np.concatenate([[r["prompt_id"]] * len(r["seeds"]) for r in rows])
    result = EvalResult(cfg.output, len(rows), len(groups), 0.0)
    for name in cfg.scorers:
        a = np.concatenate([r[f"score_a_{name}"] for r in rows])
        b = np.concatenate([r[f"score_b_{name}"] for r in rows])
        result.win_rates[name] = win_rate(a, b, groups, resamples=cfg.bootstrap, confidence=cfg.confidence,
                                          seed=cfg.seed)
        result.mean_scores[name] = {"a": float(a.mean()), "b": float(b.mean())}
    for side in SIDES:
        result.hsv[side] = np.concatenate([r[f"hsv_{side}"] for r in rows]).mean(axis=0).tolist()
    result.hsv_change = percent_change(result.hsv["a"], result.hsv["b"]).tolist()
    result.objects = report_figures(cfg, rows)
    return result


def report_figures(cfg: EvalConfig, rows: list[dict]) -> dict[str, float]:
    """The figures of the report hooks of ``cfg``'s scorers (``hgdpo.scorers.registry.report_hooks``; the judge's: the
    world's object-level colour, shape, size and position accuracy, relation accuracy and attribute
    leakage) of A's images against B's, paired by (prompt, seed), with bootstrap intervals over prompts.
    From the PNGs, in the driver: each hook reads every image again (the judge: a few milliseconds each)."""
    figures: dict[str, float] = {}
    for hook in report_hooks(cfg.scorers):
        reads: dict[str, list] = {side: [] for side in SIDES}
        groups = []
        for r in rows:
            for k in range(len(r["seeds"])):
                groups.append(str(r["prompt_id"]))
                for side in SIDES:
                    reads[side].append(hook.read(png_image(bytes(r[f"png_{side}"][k])), str(r["prompt"])))
        figures.update(hook.summarize(reads["a"], reads["b"], groups, resamples=cfg.bootstrap,
                                      confidence=cfg.confidence, seed=cfg.seed))
    return figures
