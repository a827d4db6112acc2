"""The replication's report (``hgdpo.replication.replicate``): the paper's tables as the world measured them.

Every number comes from the sweep's trial results and duels and from the pool's Fig. 5a
agreement; nothing is typed in but the paper's side. The paper's numbers are given where this
project has them (its Table 3 PickScore win rates); elsewhere its claim is stated as a direction,
and the targets say, for each claim, whether the world's measurement meets it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hgdpo.config.core import to_dict
from hgdpo.infra import storage, tracking
from hgdpo.replication.design import LOSER_RANKS, POOL_SIZES, SHARES, name_of
from hgdpo.report.pictures import interval_chart
from hgdpo.report.tables import format_duels, rate_cell
from hgdpo.sweep.mlflow_runs import mlflow_client
from hgdpo.sweep.trials import RESULT_FILE

PAPER_POOL_SIZE_PICKSCORE = {2: 66, 5: 82, 10: 84, 20: 89}  # Table 3: PickScore win rate (%) against the target model
# Table 1's rows, head to head: the baselines on the same pool, then Diffusion-DPO on the public set and its (H) subset.
TABLE1 = [("hgdpo", "sft"), ("hgdpo", "dpo-beta4"), ("hgdpo", "dpo-beta20"), ("hgdpo", "dpo"), ("hgdpo", "dpo-public"),
          ("hgdpo", "dpo-public-h")]
JUDGE, PICK = "judge", "pickscore"


@dataclass
class Target:
    claim: str
    measured: str
    met: bool | None  # None: not measurable (a trial missing)


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    here = os.getcwd()
    return os.path.relpath(path, here) if path.startswith(here + os.sep) else path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(m: dict, scorer: str) -> str:
    key = f"win_rate_{scorer}"
    if key not in m:
        return "-"
    return f"{_pct(m[key])} [{100 * m[key + '_low']:.1f}, {100 * m[key + '_high']:.1f}]"


def _cell(rate) -> str:
    return "-" if rate is None else rate_cell(rate)


def _shift(m: dict, channel: str) -> str:
    key = f"{channel}_change_pct"
    return f"{m[key]:+.2f}%" if key in m else "-"


@dataclass
class Results:
    """The sweep's metrics by trial name, its duels by (A, B) -> scorer -> WinRate, and each trial's MLflow run."""

    metrics: dict[str, dict]
    duels: dict[tuple[str, str], dict]
    parent: str = ""
    runs: dict[str, str] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_sweep(cls, result, sweep_output: str) -> "Results":
        metrics = {t.name: t.metrics for t in result.trials if t.status == "FINISHED"}
        runs = {name: storage.read_json(storage.join(sweep_output, "trials", name, RESULT_FILE), "trial result")
                .get("run_id", "") for name in metrics}
        return cls(metrics, {(d.a.name, d.b.name): d.rates for d in result.duels}, result.parent_run_id, runs,
                   {t.name: t.status for t in result.trials})

    def m(self, name: str) -> dict:
        return self.metrics.get(name, {})

    def duel(self, a: str, b: str, scorer: str = JUDGE):
        return self.duels.get((a, b), {}).get(scorer)


def _ablation(res: Results, kind: str, values: tuple, label: str, paper: dict | None, log_paper: str) -> list[str]:
    head = [label, "judge win rate vs tailored", "PickScore win rate vs tailored"]
    head += ["paper: PickScore win rate"] if paper else []
    head += ["S change", "trial"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in values:
        name = name_of(kind, v)
        m = res.m(name)
        cells = [f"{v:.0%}" if kind == "d" else str(v), _rate(m, JUDGE), _rate(m, PICK)]
        cells += [f"{paper[v]}%"] if paper else []
        cells += [_shift(m, "s"), f"`{name}`"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", log_paper]
    return lines


def _duel_lines(res: Results, pairs: list[tuple[str, str]]) -> list[str]:
    lines = ["| A | B | judge win rate of A | PickScore win rate of A |", "|---|---|---|---|"]
    for a, b in pairs:
        lines.append(f"| `{a}` | `{b}` | {_cell(res.duel(a, b))} | {_cell(res.duel(a, b, PICK))} |")
    return lines


def table1(res: Results) -> list[str]:
    """Table 1's section: HG-DPO head to head against each baseline (this project has none of the paper's
    Table 1 numbers, so the paper's side is its claim)."""
    return ["## Table 1: HG-DPO against the baselines, on the same pool and on public data", "",
            *_duel_lines(res, TABLE1), "",
            "`dpo-public`: Diffusion-DPO on the world's out-of-distribution public set (the paper's Pick-a-Pic v2), "
            "`dpo-public-h`: on its \"(H)\" subset, the pairs of the world's subjects (the paper's people-only "
            "subset); each trains on its own pool imported from the set. The paper: HG-DPO wins against each."]


def _series(res: Results, names: list[str], scorer: str) -> list:
    out = []
    for name in names:
        m = res.m(name)
        key = f"win_rate_{scorer}"
        out.append((m[key], m[key + "_low"], m[key + "_high"]) if key in m else None)
    return out


def _cut(res: Results, name: str, channel: str) -> float | None:
    """How much of DPO's shift of ``channel`` the trial removes (1 = all of it)."""
    dpo, other = res.m("dpo").get(f"{channel}_change_pct"), res.m(name).get(f"{channel}_change_pct")
    if dpo is None or other is None or dpo == 0:
        return None
    return 1 - abs(other) / abs(dpo)


def _judge(res: Results, name: str) -> float | None:
    return res.m(name).get("win_rate_judge")


def targets(res: Results) -> list[Target]:
    out = []

    def beats(a: str, b: str, claim: str) -> None:
        r = res.duel(a, b)
        out.append(Target(claim, "-" if r is None else _cell(r), None if r is None else r.low > 0.5))

    for b, what in (("sft", "SFT on the pool's winners"), ("dpo-beta4", "DPO with beta x4"),
                    ("dpo-beta20", "DPO with beta x20"), ("dpo-public", "DPO on the public set"),
                    ("dpo-public-h", "DPO on the public set's (H) subset")):
        beats("hgdpo", b, f"Table 1: HG-DPO beats {what} head to head under the judge, interval above 50%")
    beats("hgdpo", "n=2", "Table 3: N-20 beats N-2 head to head under the judge, interval above 50%")
    lo, hi = _judge(res, "n=2"), _judge(res, "hgdpo")
    out.append(Target("Table 3: the judge win rate against the tailored model rises from N-2 to N-20",
                      "-" if None in (lo, hi) else f"{_pct(lo)} -> {_pct(hi)}", None if None in (lo, hi) else hi > lo))
    beats("hgdpo", "l=2", "Table 5: L-20 beats L-2 head to head under the judge, interval above 50%")
    beats("hgdpo", "d=0.1", "Table 6: the largest D beats the smallest head to head under the judge")
    for name, label in (("hgdpo", "eq. 8 with the DDPM step"), ("hgdpo-sampler", "eq. 8 with the sampler's step")):
        s, h, j, jd = _cut(res, name, "s"), _cut(res, name, "h"), _judge(res, name), _judge(res, "dpo")
        known = None not in (s, h, j, jd)
        measured = "-" if not known else (f"S shift cut {_pct(s)}, H shift cut {_pct(h)}; judge win rate "
                                          f"{_pct(j)} vs DPO's {_pct(jd)}")
        out.append(Target(f"Table 2: SML ({label}) cuts DPO's saturation and hue shift by >= 75% with a judge win "
                          f"rate within 3 points of DPO's", measured,
                          None if not known else s >= 0.75 and h >= 0.75 and abs(j - jd) <= 0.03))
    s20, s_sml, j20, j_sml, jd = (_cut(res, "dpo-beta20", "s"), _cut(res, "hgdpo", "s"), _judge(res, "dpo-beta20"),
                                  _judge(res, "hgdpo"), _judge(res, "dpo"))
    known = None not in (s20, s_sml, j20, j_sml, jd)
    out.append(Target("Table 2: beta x20 cuts the shift less than SML for the same win-rate cost, or loses more "
                      "win rate", "-" if not known else
                      f"S cut: beta x20 {_pct(s20)}, SML {_pct(s_sml)}; judge: beta x20 {_pct(j20)}, SML {_pct(j_sml)}",
                      None if not known else (s20 < s_sml and j20 <= j_sml + 0.01) or j20 < j_sml))
    m = res.m("hgdpo")
    out.append(Target("HG-DPO beats the tailored model under the judge, interval's lower end >= 60%",
                      _rate(m, JUDGE), None if "win_rate_judge_low" not in m else m["win_rate_judge_low"] >= 0.60))
    return out


def _picture(cfg, stem: str, image) -> str:
    """Save a picture beside the report; its name relative to the report."""
    name = f"{stem}.png"
    storage.write_png(storage.join(storage.parent(report_location(cfg)), name), image)
    return name


def report_location(cfg) -> str:
    return cfg.report or storage.join(cfg.output, "replication.md")


def write_report(cfg, result, agreement: dict, prompts: int, log=print) -> str:
    res = Results.of_sweep(result, storage.join(cfg.output, "sweep"))
    ev = {**cfg.evaluate}
    seeds = ev.get("images_per_prompt", 1)
    lines = [
        "# HG-DPO's tables in the miniature world",
        "",
        f"Made by `python jobs/replicate.py` (settings below): one pool of N = {cfg.pool.get('images_per_prompt', 20)} "
        f"images for each of {prompts} prompts of `{_shown(cfg.train_prompts)}`, the trials of every table trained on it, "
        f"and each trial's adapter (A) evaluated against the tailored model (B) on the held-out prompts of "
        f"`{_shown(cfg.test_prompts)}` x {seeds} seed(s), the same prompts and seeds for every trial. The world's judge "
        f"counts unmet constraints (the \"human\" raters); the world's PickScore is the AI feedback the pool was "
        f"ranked by. Intervals are {ev.get('confidence', 0.95):.0%} bootstrap intervals over prompts. MLflow: "
        f"parent run `{res.parent}` at `{tracking.redact(tracking.tracking_uri(cfg.mlflow_uri))}`.",
        "",
        "## Targets",
        "",
        "| claim | measured | met |",
        "|---|---|---|",
    ]
    for t in targets(res):
        lines.append(f"| {t.claim} | {t.measured} | {'-' if t.met is None else 'yes' if t.met else 'no'} |")

    if cfg.notes:
        lines += ["", "## What the measurements say", "", Path(cfg.notes).read_text().strip()]

    n_names = [name_of("n", n) for n in POOL_SIZES]
    chart = interval_chart("Table 3: win rate against the tailored model by pool size N",
                           [f"N={n}" for n in POOL_SIZES],
                           {"judge": _series(res, n_names, JUDGE), "PickScore": _series(res, n_names, PICK),
                            "paper PickScore": [(v / 100, v / 100, v / 100) for v in PAPER_POOL_SIZE_PICKSCORE.values()]},
                           "win rate", reference=0.5)
    lines += ["", "## Table 3: pool size N", "",
              *_ablation(res, "n", POOL_SIZES, "N", PAPER_POOL_SIZE_PICKSCORE,
                         "The paper: the PickScore win rate rises with N, most from N = 2 to 5."),
              "", *_duel_lines(res, [("hgdpo", "n=2"), ("n=5", "n=2"), ("n=10", "n=5"), ("hgdpo", "n=10")]),
              "", f"![win rate by N]({_picture(cfg, 'replication-table3', chart)})"]
    lines += ["", "## Table 5: loser rank L (the winner against the L-th best of 20)", "",
              *_ablation(res, "l", LOSER_RANKS, "L", None,
                         "The paper: the worst image as the loser (L = 20) is best."),
              "", *_duel_lines(res, [("hgdpo", "l=2"), ("hgdpo", "l=10")])]
    lines += ["", f"## Table 6: dataset size D (share of the pool's {prompts} prompts, the same steps)", "",
              *_ablation(res, "d", SHARES, "D", None, "The paper: more prompts are better."),
              "", *_duel_lines(res, [("hgdpo", "d=0.1"), ("hgdpo", "d=0.5")])]

    rows2 = [("dpo", "Diffusion-DPO"), ("hgdpo", "+ SML (eq. 8, DDPM step)"),
             ("hgdpo-sampler", "+ SML (eq. 8, sampler step)"), ("dpo-beta4", "DPO, beta x4"),
             ("dpo-beta20", "DPO, beta x20")]
    lines += ["", "## Table 2: colour shift (mean H, S, V of A's images against B's)", "",
              "| setting | H change | S change | V change | S shift cut | judge win rate vs tailored | "
              "SML / DPO gradient norm | trial |", "|---|---|---|---|---|---|---|---|"]
    for name, label in rows2:
        m, cut = res.m(name), _cut(res, name, "s")
        ratio = _grad_ratio(cfg, res.runs.get(name))
        lines.append(f"| {label} | {_shift(m, 'h')} | {_shift(m, 's')} | {_shift(m, 'v')} | "
                     f"{'-' if cut is None or name == 'dpo' else _pct(cut)} | {_rate(m, JUDGE)} | "
                     f"{'-' if ratio is None else f'{ratio:.3g}'} | `{name}` |")
    lines += ["", "The paper: DPO shifts the colours; SML removes the shift at a small cost in win rate; a "
              "larger beta reduces it less, or costs more."]
    chart = interval_chart("Table 2: saturation change against the tailored model (%)", [n for n, _ in rows2],
                           {"S change": [(m, m, m) if m is not None else None
                                         for m in (res.m(n).get("s_change_pct") for n, _ in rows2)]},
                           "S change %", reference=0.0)
    lines += ["", f"![saturation change]({_picture(cfg, 'replication-table2', chart)})"]

    lines += ["", *table1(res)]

    lines += ["", "## Fig. 5a: does the AI feedback agree with the judge? (every pool prompt)", "",
              "| n | judge win rate of the PickScore winner of the first n over their PickScore loser |", "|---|---|"]
    for n in sorted(agreement):
        lines.append(f"| {n} | {_cell(agreement[n])} |")
    lines += ["", "The paper: the best-vs-worst pair of a larger pool agrees with people more often."]

    lines += ["", "## Every trial", "", result.table()]
    if result.duels:
        lines += ["", format_duels(result.duels, result.scorers)]
    lines += ["", "| trial | MLflow run |", "|---|---|"]
    lines += [f"| `{name}` | `{run}` |" for name, run in res.runs.items()]
    unfinished = [n for n, s in res.status.items() if s != "FINISHED"]
    if unfinished:
        lines += ["", f"Not finished: {', '.join(unfinished)} (rerun the command to run them)."]
    lines += ["", "## Settings", "", "```yaml", _settings(cfg), "```"]
    location = report_location(cfg)
    storage.write_text(location, "\n".join(lines) + "\n")
    log(f"replicate: report written to {location}")
    return location


def _settings(cfg) -> str:
    data = to_dict(cfg)
    if data.get("mlflow_uri"):
        data["mlflow_uri"] = tracking.redact(data["mlflow_uri"])
    return yaml.safe_dump(data, sort_keys=False).rstrip()


def _grad_ratio(cfg, run_id: str | None) -> float | None:
    """A trial's last ``stat_dpo_grad_ratio`` probe, the term's weight where training ended (None without
    statistic matching). Not the mean: earlier runs also probed step 0, where the ratio is 0 by construction."""
    if not run_id:
        return None
    history = mlflow_client(tracking.tracking_uri(cfg.mlflow_uri)).get_metric_history(run_id, "stat_dpo_grad_ratio")
    return max(history, key=lambda h: h.step).value if history else None
