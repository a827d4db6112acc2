"""A study's results: human win rates, rater agreement, gold flags, AI-feedback agreement; exports.

* A vote counts 1 for A, 0 for B, 0.5 for a tie. The human win rate of A over B is the mean over
  the votes on pairs; its interval resamples *items* with replacement (with all their votes),
  through ``hgdpo.report.winrates.win_rate`` (the evaluation's statistics).
* The AI feedback's win rate is the same statistic of its scores on the same items, one
  comparison per item: with one rater answering by the scorer itself, the two are equal.
* Agreement of the AI feedback with people (Fig. 5a for a pool): per vote on an item where the AI
  prefers one side, 1 if the person chose that side, 0 if the other, 0.5 for a tie. For a pool
  (the AI always prefers A, the winner) it equals the human win rate.
* Inter-rater agreement: Krippendorff's alpha, nominal (A / B / tie), from the ``krippendorff``
  package, over pairs with at least two votes.
* A rater who answered gold items and got less than ``gold_pass`` of them right (a tie is wrong)
  is flagged; ``exclude_flagged`` drops their votes from every figure. The summary says who was
  flagged on which gold items, how often each gold item was failed (one failed by many raters is
  more likely a bad item than bad raters), and what share of the votes on pairs the flagged raters
  cast; above ``FLAGGED_SHARE_WARNING`` it carries a ``warning``.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage, tracking
from hgdpo.infra.locations import check_tracking_uri
from hgdpo.report.winrates import WinRate, win_rate
from hgdpo.study import db

VALUE = {"a": 1.0, "b": 0.0, "tie": 0.5}
FLAGGED_SHARE_WARNING = 0.2  # more of the votes on pairs than this from flagged raters: a warning
NOMINAL = {"a": 0, "b": 1, "tie": 2}


def flagged_raters(engine, study_id: str, gold_pass: float) -> list[str]:
    return [r["name"] for r in db.rater_progress(engine, study_id)
            if r["gold_answered"] and r["gold_right"] / r["gold_answered"] < gold_pass]


def gold_report(all_votes: list[dict], flagged: list[str], exclude_flagged: bool) -> dict:
    """Who was flagged on which gold items, each gold item's failures, the flagged raters' share of
    the votes on pairs, and a warning when that share is above ``FLAGGED_SHARE_WARNING``."""
    gold = [v for v in all_votes if v["gold"]]
    items: dict[int, dict] = {}
    for v in gold:
        entry = items.setdefault(v["item_id"], {"item": v["item_id"], "prompt_id": v["prompt_id"], "answered": 0,
                                                "wrong": 0})
        entry["answered"] += 1
        entry["wrong"] += v["answer"] != "a"
    raters = [{"rater": name, "gold_answered": sum(v["rater"] == name for v in gold),
               "failed_items": sorted(v["item_id"] for v in gold if v["rater"] == name and v["answer"] != "a")}
              for name in flagged]
    on_pairs = [v for v in all_votes if not v["gold"]]
    by_flagged = sum(v["rater"] in flagged for v in on_pairs)
    share = by_flagged / len(on_pairs) if on_pairs else None
    warning = None
    if share is not None and share > FLAGGED_SHARE_WARNING:
        worst = max(items.values(), key=lambda e: (e["wrong"], -e["item"]))
        warning = (f"{len(flagged)} flagged raters cast {share:.0%} of the votes on pairs ({by_flagged} of "
                   f"{len(on_pairs)}){', all left out' if exclude_flagged else ''}; above "
                   f"{FLAGGED_SHARE_WARNING:.0%}, check the gold items before trusting the figures (item "
                   f"{worst['item']} was failed by {worst['wrong']} of {worst['answered']} raters)")
    return {"flagged_raters": raters, "gold_items": sorted(items.values(), key=lambda e: e["item"]),
            "flagged_votes": by_flagged, "flagged_share": share, "warning": warning}


def _rate(values: list[float], groups: list[int], resamples: int, confidence: float, seed: int) -> WinRate:
    # A value v against 0.5: 1 -> win, 0.5 -> tie, 0 -> loss, which is exactly how a vote counts.
    return win_rate(np.asarray(values), np.full(len(values), 0.5), np.asarray(groups), resamples=resamples,
                    confidence=confidence, seed=seed)


def alpha(pair_votes: list[dict]) -> tuple[float | None, str]:
    """Krippendorff's alpha (nominal) of the votes, and a note when it is undefined."""
    import krippendorff

    by_item: dict[int, int] = {}
    for v in pair_votes:
        by_item[v["item_id"]] = by_item.get(v["item_id"], 0) + 1
    shared = sorted(i for i, n in by_item.items() if n >= 2)
    raters = sorted({v["rater"] for v in pair_votes if v["item_id"] in by_item and by_item[v["item_id"]] >= 2})
    if not shared:
        return None, "no pair has votes from two raters"
    matrix = np.full((len(raters), len(shared)), np.nan)
    row, col = {r: i for i, r in enumerate(raters)}, {it: j for j, it in enumerate(shared)}
    for v in pair_votes:
        if v["item_id"] in col:
            matrix[row[v["rater"]], col[v["item_id"]]] = NOMINAL[v["answer"]]
    if len(np.unique(matrix[~np.isnan(matrix)])) < 2:
        return None, "every vote is the same answer (alpha is undefined)"
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")), ""


def summary(engine, study_id: str, *, exclude_flagged: bool = True, gold_pass: float = 1.0, resamples: int = 2000,
            confidence: float = 0.95, seed: int = 0) -> dict:
    """Every figure of a study as plain data (what results.json, the admin page and MLflow show)."""
    study = db.study(engine, study_id)
    all_votes = db.votes_table(engine, study_id)
    flagged = flagged_raters(engine, study_id, gold_pass)
    kept = [v for v in all_votes if not (exclude_flagged and v["rater"] in flagged)]
    pairs = [v for v in kept if not v["gold"]]
    out = {"study": study_id, "kind": study["kind"], "source": study["source"], "scorer": study["scorer"],
           "question": study["question"], "exclude_flagged": exclude_flagged, "gold_pass": gold_pass,
           "flagged": flagged, **gold_report(all_votes, flagged, exclude_flagged),
           "votes": len(pairs), "gold_votes": sum(v["gold"] for v in kept),
           "items": len({v["item_id"] for v in pairs}), "raters": len({v["rater"] for v in pairs}),
           "human": None, "ai": None, "ai_agreement": None, "alpha": None, "alpha_note": "no votes on pairs"}
    if not pairs:
        return out
    kw = {"resamples": resamples, "confidence": confidence, "seed": seed}
    out["human"] = _rate([VALUE[v["answer"]] for v in pairs], [v["item_id"] for v in pairs], **kw).__dict__
    per_item = {v["item_id"]: (v["ai_a"], v["ai_b"]) for v in pairs}
    ids = sorted(per_item)
    out["ai"] = win_rate(np.array([per_item[i][0] for i in ids]), np.array([per_item[i][1] for i in ids]),
                         np.array(ids), **kw).__dict__
    agree = [(v, VALUE[v["answer"]] if v["ai_a"] > v["ai_b"] else 1.0 - VALUE[v["answer"]])
             for v in pairs if v["ai_a"] != v["ai_b"]]
    if agree:
        out["ai_agreement"] = _rate([a for _, a in agree], [v["item_id"] for v, _ in agree], **kw).__dict__
    out["alpha"], out["alpha_note"] = alpha(pairs)
    return out


def votes_columns(engine, study_id: str, gold_pass: float) -> dict[str, list]:
    """Every vote (gold included, flagged raters marked) as columns for votes.parquet / votes.csv."""
    flagged = set(flagged_raters(engine, study_id, gold_pass))
    rows = db.votes_table(engine, study_id)
    names = ["vote_id", "rater", "item_id", "position", "gold", "prompt_id", "prompt", "seed", "ai_a", "ai_b",
             "flip", "choice", "answer", "created"]
    columns = {n: [r[n] for r in rows] for n in names}
    columns["shown_left"] = ["b" if r["flip"] else "a" for r in rows]
    columns["rater_flagged"] = [r["rater"] in flagged for r in rows]
    return columns


def write(engine, cfg) -> dict:
    """results.json, votes.parquet and votes.csv in ``cfg.output`` (a ``ResultsConfig``); returns the summary."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    result = summary(engine, cfg.study, exclude_flagged=cfg.exclude_flagged, gold_pass=cfg.gold_pass,
                     resamples=cfg.bootstrap, confidence=cfg.confidence)
    table = pa.table(votes_columns(engine, cfg.study, cfg.gold_pass))
    storage.makedirs(cfg.output)
    storage.write_parquet(storage.join(cfg.output, "votes.parquet"), table)
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    storage.write_bytes(storage.join(cfg.output, "votes.csv"), buffer.getvalue())
    storage.write_json(storage.join(cfg.output, "results.json"), result)  # last: the folder is complete
    return result


def metrics(result: dict) -> dict[str, float]:
    out = {"votes": float(result["votes"]), "items": float(result["items"]), "raters": float(result["raters"]),
           "flagged_raters": float(len(result["flagged"]))}
    if result["flagged_share"] is not None:
        out["flagged_vote_share"] = float(result["flagged_share"])
    for key in ("human", "ai", "ai_agreement"):
        if result[key]:
            out[f"{key}_win_rate" if key != "ai_agreement" else "ai_agreement"] = result[key]["rate"]
            out[f"{key}_low"], out[f"{key}_high"] = result[key]["low"], result[key]["high"]
    if result["alpha"] is not None:
        out["krippendorff_alpha"] = result["alpha"]
    return {k: v for k, v in out.items() if not math.isnan(v)}


def source_run(uri: str, source: str) -> str | None:
    """The MLflow run of the evaluation or pool the study came from (its ``output`` tag), if recorded."""
    import mlflow

    if "'" in source:
        return None
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.output = '{source}'",
                              order_by=["start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def log_mlflow(cfg, result: dict, study_config: dict) -> str:
    """One MLflow run for the results, tagged with the source and the source's run id; returns its id."""
    import tempfile
    from pathlib import Path

    import mlflow

    uri = tracking.tracking_uri(cfg.mlflow_uri)
    check_tracking_uri(uri, "mlflow_uri")
    linked = source_run(uri, result["source"])
    with tracking.run(uri, cfg.mlflow_experiment, run_name=f"study:{cfg.study}") as active:
        mlflow.log_params(tracking.flat_params({**{f"create.{k}": v for k, v in study_config.items()
                                                   if k not in ("db", "invites")},
                                                "exclude_flagged": cfg.exclude_flagged, "gold_pass": cfg.gold_pass}))
        tags = {"stage": "study", "study": cfg.study, "kind": result["kind"], "source": result["source"],
                "output": storage.absolute(cfg.output)}
        if linked:
            tags["source_run_id"] = linked
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics(result))
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "results.json").write_text(json.dumps(result, indent=2))
            mlflow.log_artifacts(tmp, artifact_path="study")
        return active.info.run_id


def export_pickapic(engine, cfg) -> int:
    """The votes as a Pick-a-Pic-style preference set; returns the rows written.

    Columns: ``caption``, ``jpg_0`` (A's image), ``jpg_1`` (B's), ``label_0`` (1: A preferred,
    0: B, 0.5: tie), ``label_1 = 1 - label_0``, ``has_label`` and ``are_different`` (true, as
    Pick-a-Pic v2 marks a real vote on two images), and ``study``, ``item_id``, ``rater``. The image
    bytes are the PNGs people saw (lossless; any reader that decodes with PIL opens them, as
    Pick-a-Pic readers do). Gold items are left out, and flagged raters' votes if asked.
    """
    import pyarrow as pa

    flagged = set(flagged_raters(engine, cfg.study, cfg.gold_pass))
    db.study(engine, cfg.study)
    rows = [v for v in db.votes_table(engine, cfg.study, with_images=True)
            if not v["gold"] and not (cfg.exclude_flagged and v["rater"] in flagged)
            and not (cfg.ties == "drop" and v["answer"] == "tie")]
    if not rows:
        raise HgdpoError(f"export: study {cfg.study!r} has no votes to export (with these settings)")
    label = [VALUE[v["answer"]] for v in rows]
    table = pa.table({"caption": [v["prompt"] for v in rows],
                      "jpg_0": pa.array([bytes(v["image_a"]) for v in rows], pa.binary()),
                      "jpg_1": pa.array([bytes(v["image_b"]) for v in rows], pa.binary()),
                      "label_0": label, "label_1": [1.0 - x for x in label],
                      "has_label": [True] * len(rows), "are_different": [True] * len(rows),
                      "study": [cfg.study] * len(rows), "item_id": [v["item_id"] for v in rows],
                      "rater": [v["rater"] for v in rows]})
    storage.write_parquet(cfg.output, table)
    return table.num_rows
