"""The user study's steps as commands (``hgdpo study <step>`` / ``jobs/study.py <step>``; ``hgdpo.stages``):
create a study, serve it, add or revoke raters, read the results, export the votes. Each prints what it did."""

from __future__ import annotations

import json
import sys

from hgdpo.study import db
from hgdpo.study.app import make_app
from hgdpo.study.config import CreateConfig, ExportConfig, RatersConfig, ResultsConfig, ServeConfig
from hgdpo.study.create import add_raters, write_invites
from hgdpo.study.create import create as make
from hgdpo.study.results import export_pickapic, log_mlflow, write


def run_create(cfg: CreateConfig, args=None) -> None:
    study_id, invites = make(cfg)
    print(f"study {study_id}: {len(invites) - 1} raters invited; links (admin first) in {cfg.invites}")


def run_serve(cfg: ServeConfig, args=None) -> None:
    import uvicorn

    engine = db.connect(cfg.db)
    print(f"study server on http://{cfg.host}:{cfg.port} (ctrl-c stops it)", flush=True)
    uvicorn.run(make_app(engine, max_body=cfg.max_body, secure_cookies=cfg.secure_cookies), host=cfg.host,
                port=cfg.port, access_log=False, log_level="warning")


def run_raters(cfg: RatersConfig, args=None) -> None:
    engine = db.connect(cfg.db)
    db.study(engine, cfg.study)
    if cfg.revoke is not None:
        db.revoke(engine, cfg.study, cfg.revoke)
        print(f"study {cfg.study}: {cfg.revoke} revoked")
    if cfg.add:
        invites = add_raters(engine, cfg.study, cfg.add, cfg.seed, cfg.base_url)
        write_invites(cfg.invites, invites, append=True)
        print(f"study {cfg.study}: {len(invites)} raters invited; links in {cfg.invites}")


def run_results(cfg: ResultsConfig, args=None) -> None:
    engine = db.connect(cfg.db)
    study = db.study(engine, cfg.study)
    result = write(engine, cfg)
    if cfg.mlflow:
        run_id = log_mlflow(cfg, result, json.loads(study["config"]))
        print(f"mlflow run {run_id}")
    if result["warning"]:
        print(f"warning: study {cfg.study}: {result['warning']}", file=sys.stderr)
    human = result["human"]
    if human is None:
        print(f"study {cfg.study}: no votes on pairs yet -> {cfg.output}")
        return
    alpha = "n/a" if result["alpha"] is None else f"{result['alpha']:.3f}"
    print(f"study {cfg.study}: human win rate of A {human['rate']:.3f} [{human['low']:.3f}, {human['high']:.3f}] "
          f"from {result['votes']} votes on {result['items']} pairs by {result['raters']} raters; "
          f"{result['scorer']} {result['ai']['rate']:.3f}; alpha {alpha}; "
          f"{len(result['flagged'])} raters flagged ({result['flagged_share']:.0%} of the votes on pairs) "
          f"-> {cfg.output}")


def run_export(cfg: ExportConfig, args=None) -> None:
    rows = export_pickapic(db.connect(cfg.db), cfg)
    print(f"study {cfg.study}: {rows} preferences -> {cfg.output}")
