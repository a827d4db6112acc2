"""A sweep's tables: one row per trial (the paper's way), and the duels' head-to-head tables.

``format_table`` makes the trials' table from their parameters and metrics; ``format_duels`` and
``format_comparisons`` the head-to-head tables of duels (``hgdpo.report.duel``): win rates, then the
rates of the scorers' report hooks (the judge's objects). ``table_from_mlflow`` makes both again from
what MLflow holds of a sweep (``hgdpo table``): its parent run, the trials' nested runs, and the
parent's ``h2h_*`` metrics (``duels_from_metrics``).
"""

from __future__ import annotations

import ast

from hgdpo.errors import HgdpoError
from hgdpo.infra import tracking
from hgdpo.report.duel import Duel, hook_rates
from hgdpo.report.winrates import WinRate
from hgdpo.scorers.base import ReportHook
from hgdpo.scorers.registry import report_hooks
from hgdpo.sweep.config import value_text

PARENT_TAG = "mlflow.parentRunId"  # MLflow's tag of a nested run: its parent's id


def _number(value: str) -> str:
    """A parameter value as shown: ``2500.0`` -> ``2500``, ``True`` -> ``true``."""
    try:
        return value_text(float(value)) if value not in ("True", "False") else value.lower()
    except ValueError:
        return value


def format_table(rows: list[dict], swept: list[str], scorers: list[str]) -> str:
    """One row per trial: swept parameters, win rate per scorer with its interval, H/S/V change.

    ``rows``: ``{"trial", "params" (name -> value), "metrics" (as ``EvalResult.metrics``), "status"}``.
    """
    head = ["trial", *swept, *(f"{s} win rate [interval]" for s in scorers), "H change", "S change", "V change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m, cells = row["metrics"], [row["trial"]]
        cells += [_number(str(row["params"].get(k, ""))) for k in swept]
        for s in scorers:
            if f"win_rate_{s}" in m:
                cells.append(f"{100 * m[f'win_rate_{s}']:.1f}% [{100 * m[f'win_rate_{s}_low']:.1f}, "
                             f"{100 * m[f'win_rate_{s}_high']:.1f}]")
            else:
                cells.append(row.get("status") or "-")
        cells += [f"{m[f'{c}_change_pct']:+.2f}%" if f"{c}_change_pct" in m else "-" for c in "hsv"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_duels(duels: list[Duel], scorers: list[str]) -> str:
    """The head-to-head tables of a sweep's duels (``format_comparisons``)."""
    return format_comparisons([(d.a.name, d.b.name, d.rates, d.objects) for d in duels], scorers)


def format_comparisons(rows: list[tuple[str, str, dict, dict]], scorers: list[str]) -> str:
    """The head-to-head tables of (A name, B name, scorer -> WinRate, object rates) rows: win rates, then
    (where the world's judge scored them) the object-level differences."""
    text = _duel_table([(a, b, rates) for a, b, rates, _ in rows], scorers)
    for hook in report_hooks(scorers):
        figures = [(a, b, {r: (found[f"{r}_diff"], found[f"{r}_diff_low"], found[f"{r}_diff_high"])
                           for r in hook_rates(hook, found)}) for a, b, _, found in rows if hook_rates(hook, found)]
        text += "\n\n" + _hook_table(hook, figures) if figures else ""
    return text


def _hook_table(hook: ReportHook, rows: list[tuple[str, str, dict]]) -> str:
    """The head-to-head table of a report hook's rates (the judge's objects): one row per (A trial, B trial,
    rate -> (A - B, low, high))."""
    shown = [(rate, label) for rate, label in hook.rates if any(rate in cells for _, _, cells in rows)]
    lines = [f"{hook.kind.capitalize()} head to head ({hook.source}; A's rate minus B's in points, paired by "
             "prompt and seed):", "",
             "| A | B | " + " | ".join(label for _, label in shown) + " |", "|" + "---|" * (2 + len(shown))]
    for a, b, cells in rows:
        lines.append("| " + " | ".join([a, b, *(f"{100 * cells[r][0]:+.1f} [{100 * cells[r][1]:+.1f}, "
                                                f"{100 * cells[r][2]:+.1f}]" if r in cells else "-"
                                                for r, _ in shown)]) + " |")
    return "\n".join(lines)


def _duel_table(rows: list[tuple[str, str, dict]], scorers: list[str]) -> str:
    """The head-to-head table: one row per (A trial, B trial, scorer -> WinRate)."""
    head = ["A", "B", *(f"{s} win rate of A [interval]" for s in scorers)]
    lines = ["Head to head (A's adapter against B's, on the same prompts and seeds):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b, rates in rows:
        lines.append("| " + " | ".join([a, b, *(rate_cell(rates[s]) if s in rates else "-" for s in scorers)]) + " |")
    return "\n".join(lines)


def table_from_mlflow(name: str, uri: str | None = None, experiment: str = "hgdpo-sweep") -> str:
    """The table of sweep ``name`` as MLflow holds it (its latest parent run of that name)."""
    import mlflow  # heavy (about 1 s to import): only the table from MLflow needs it

    uri = tracking.tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise HgdpoError(f"table: no experiment {experiment!r} at {uri}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{name}' and tags.stage = 'sweep'",
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise HgdpoError(f"table: no sweep named {name!r} in experiment {experiment!r} at {uri}")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], max_results=10000,
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    children.sort(key=lambda r: int(r.data.tags.get("trial_index", 0)))
    swept = [k for k in parent.data.tags.get("swept", "").split(",") if k]
    scorers: list[str] = []
    for child in children:
        raw = child.data.params.get("evaluate.scorers")
        for s in (ast.literal_eval(raw) if raw else []):
            if s not in scorers:
                scorers.append(s)
    rows = [{"trial": c.data.tags.get("trial", c.info.run_name), "params": c.data.params, "metrics": c.data.metrics,
             "status": c.info.status} for c in children]
    output = parent.data.tags.get("sweep_output", "")
    head = (f"sweep {name}: {len(children)} trials, {parent.info.status.lower()} ({output}); "
            f"A = the trial's adapter, B = the base model")
    if len(parents) > 1:
        head += f"\n(the latest of {len(parents)} sweeps named {name!r}; the others wrote elsewhere)"
    text = head + "\n\n" + format_table(rows, swept, scorers)
    names = {int(c.data.tags.get("trial_index", 0)): rows[i]["trial"] for i, c in enumerate(children)}
    duels = duels_from_metrics(parent.data.metrics, names, scorers)
    return text + ("\n\n" + duels if duels else "")


def duels_from_metrics(metrics: dict[str, float], names: dict[int, str], scorers: list[str]) -> str:
    """``format_duels``'s table again, from the parent run's ``h2h_*`` metrics."""
    hooks = report_hooks(scorers)
    found: dict[tuple[int, int], dict] = {}
    figures: dict[str, dict[tuple[int, int], dict]] = {hook.kind: {} for hook in hooks}
    for key, value in metrics.items():
        parts = key.split("_")
        if key.startswith("h2h_") and len(parts) >= 5 and parts[2] == "over" and parts[-1] not in ("low", "high"):
            a, b, what = int(parts[1]), int(parts[3]), "_".join(parts[4:])
            low, high = metrics[f"{key}_low"], metrics[f"{key}_high"]
            kind = next((h.kind for h in hooks if what.startswith(f"{h.kind}_")), None)
            if kind is not None:
                figures[kind].setdefault((a, b), {})[what.removeprefix(f"{kind}_")] = (value, low, high)
            else:
                found.setdefault((a, b), {})[what] = WinRate(value, low, high, 0, 0, 0, 0)
    order = sorted(found, key=lambda ab: (ab[0] - ab[1] != 1, ab[0]))  # neighbours, then the last against the first
    rows = [(names.get(a, str(a)), names.get(b, str(b)), found[a, b]) for a, b in order]
    text = _duel_table(rows, scorers) if rows else ""
    for hook in hooks:
        cells = figures[hook.kind]
        hook_rows = [(names.get(a, str(a)), names.get(b, str(b)), cells[a, b]) for a, b in order if (a, b) in cells]
        text += "\n\n" + _hook_table(hook, hook_rows) if hook_rows else ""
    return text


def rate_cell(r: WinRate) -> str:
    """A WinRate as a table cell: ``53.2% [50.0, 56.8]``."""
    return f"{100 * r.rate:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]"
