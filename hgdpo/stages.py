"""The stages as commands: one entry point per stage for ``hgdpo <stage>`` and ``jobs/<stage>.py`` alike.

Each stage is its typed config and a function that does the work; ``main`` gives every stage the same
command line (``--config FILE`` then ``key=value`` overrides, ``section.key=value`` for a config holding
other stages' settings, ``--help`` listing every setting) and the same exit codes: 0 done, 2 bad input
(a message naming the setting, file or row, and nothing written that looks complete), 1 a failure (the
traceback is printed). The scripts in ``jobs/`` stay, for ``ray job submit --working-dir .``; each is
its stage's ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgdpo.config.core import load_config
from hgdpo.config.reference import describe
from hgdpo.errors import HgdpoError
from hgdpo.infra.locations import absolute, is_local
from hgdpo.infra.quiet import quiet_libraries


@dataclass(frozen=True)
class Stage:
    """A stage: what it does, its config (``module:Class``), what runs it (``module:function``, called
    with the config and the parsed flags, returning the line to print at the end, or None) and its flags."""

    summary: str
    config: str
    runner: str
    flags: tuple[tuple[str, str], ...] = ()

    def config_class(self) -> type:
        return resolve(self.config)

    def run(self, cfg: Any, args: argparse.Namespace) -> str | None:
        return resolve(self.runner)(cfg, args)


def resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


NO_MLFLOW = ("--no-mlflow", "do not record the run in MLflow")
STAGES: dict[str, Stage] = {
    "pool": Stage("build a preference pool: N images per prompt from your model, ranked by PickScore (paper 3.1)",
                  "hgdpo.pool.config:PoolConfig", "hgdpo.stages:run_pool",
                  (NO_MLFLOW, ("--no-ray", "build in this process without Ray (one model, torch's threads)"),
                   ("--verify", "on a finished pool, read every part and check its checksum; rebuild the bad ones"))),
    "train": Stage("train LoRA with HG-DPO or another objective (the `objective` setting) on a pool, on Ray Train",
                   "hgdpo.train.config:TrainConfig", "hgdpo.stages:run_train"),
    "sample": Stage("sample images of prompts, with an adapter at weight alpha and optionally LAN",
                    "hgdpo.evaluate.sample_config:SampleConfig", "hgdpo.stages:run_sample"),
    "evaluate": Stage("evaluate model A against baseline B on test prompts: win rates and colour",
                      "hgdpo.evaluate.config:EvalConfig", "hgdpo.stages:run_evaluate", (NO_MLFLOW,)),
    "sweep": Stage("a sweep of trainings and their evaluations (on a shared pool, or a trial's own), on Ray Tune",
                   "hgdpo.sweep.config:SweepConfig", "hgdpo.stages:run_sweep"),
    "run": Stage("the whole method: pool, HG-DPO, evaluation", "hgdpo.run:RunConfig", "hgdpo.stages:run_run"),
    "replicate": Stage("the paper's tables in the miniature world: one pool, every table's trials, one report",
                       "hgdpo.replication.config:ReplicateConfig", "hgdpo.stages:run_replicate"),
    "import": Stage("import a public preference set (Pick-a-Pic v2, HPDv2, an hgdpo export) as a pool of pairs",
                    "hgdpo.interchange.config:ImportConfig", "hgdpo.stages:run_import",
                    (("--no-ray", "import in this process without Ray"),)),
    "export": Stage("export a pool's pairs as Pick-a-Pic-style parquet, for other Diffusion-DPO tools",
                    "hgdpo.interchange.config:PairsExportConfig", "hgdpo.stages:run_export"),
    "export-lora": Stage("export an adapter as a diffusers folder or one kohya file (A1111, ComfyUI)",
                         "hgdpo.models.kohya:ExportConfig", "hgdpo.stages:run_export_lora"),
}
STEPS = {"study": ("create", "serve", "raters", "results", "export")}  # a stage of several steps: "<stage> <step>"
for _step, _summary in zip(STEPS["study"], (
        "create a user study from an evaluation (A vs B) or a pool (winner vs loser), with rater invites",
        "serve a study's web app (127.0.0.1 by default)", "add or revoke a study's raters",
        "a study's results: human win rate, agreement with the AI feedback, alpha, flagged raters; MLflow",
        "export a study's votes as a Pick-a-Pic-style preference set")):
    STAGES[f"study {_step}"] = Stage(_summary, f"hgdpo.study.config:{_step.capitalize()}Config",
                                     f"hgdpo.study.commands:run_{_step}")


def run_pool(cfg, args) -> str | None:
    from hgdpo.pool.build import build_pool  # late: a stage's work (Ray, torch) loads when it runs

    result = build_pool(cfg, mlflow=not args.no_mlflow, local=args.no_ray, verify=args.verify)
    if result.skipped:
        return None
    return f"pool: {result.built} prompts built in {result.seconds:.1f}s ({result.images_per_second:.2f} images/s)"


def run_train(cfg, args) -> str | None:
    from hgdpo.train.trainer import train  # late: a stage's work (Ray, torch) loads when it runs

    result = train(cfg)
    if result.skipped:
        return None
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    return f"train: {result.steps} steps; last metrics {shown}"


def run_sample(cfg, args) -> str:
    from hgdpo.evaluate.samples import run  # late: a stage's work (Ray, torch) loads when it runs

    start = time.perf_counter()
    manifest = run(cfg)
    if manifest is None:
        return f"sample: {cfg.output} is already finished with these settings; nothing to do"
    return f"sample: {len(manifest['files'])} images written to {cfg.output} in {time.perf_counter() - start:.1f}s"


def run_evaluate(cfg, args) -> str:
    from hgdpo.evaluate.eval_result import table  # late: a stage's work (Ray, torch) loads when it runs
    from hgdpo.evaluate.evaluate import evaluate  # late: a stage's work (Ray, torch) loads when it runs

    result = evaluate(cfg, record_mlflow=not args.no_mlflow)
    done = "" if result.skipped else \
        f"\nevaluate: {result.comparisons} comparisons in {result.seconds:.1f}s -> {cfg.output}"
    return table(cfg, result) + done


def run_sweep(cfg, args) -> str:
    from hgdpo.sweep.sweep import sweep  # late: a stage's work (Ray, torch) loads when it runs

    result = sweep(cfg)
    ran = [t.name for t in result.trials if not t.skipped]
    return (f"\n{result.table()}\n\nsweep {result.name}: {len(ran)} trial(s) run, {len(result.trials) - len(ran)} "
            f"finished earlier; everything under {result.output}; MLflow parent run {result.parent_run_id}")


def run_run(cfg, args) -> str:
    from hgdpo.evaluate.eval_result import summary  # late: a stage's work (Ray, torch) loads when it runs
    from hgdpo.run import run  # late: a stage's work (Ray, torch) loads when it runs

    result = run(cfg)
    return (f"\n{summary(cfg.stages()[2], result.evaluation)}\n\nrun: pool {result.pool_seconds:.0f}s, train "
            f"{result.train_seconds:.0f}s, evaluate {result.evaluate_seconds:.0f}s; everything under {cfg.output}")


def run_replicate(cfg, args) -> str:
    from hgdpo.replication.replicate import replicate  # late: a stage's work (Ray, torch) loads when it runs

    return f"\nreplicate: the report is {replicate(cfg)}"


def run_import(cfg, args) -> str | None:
    from hgdpo.interchange.import_job import import_pairs  # late: a stage's work (Ray, torch) loads when it runs

    result = import_pairs(cfg, local=args.no_ray)
    if result.skipped:
        return None
    return f"import: {result.built} pairs encoded in {result.seconds:.1f}s ({result.pairs_per_second:.1f} pairs/s)"


def run_export(cfg, args) -> str:
    from hgdpo.interchange.pairs_export import export_pairs  # late: a stage's work (Ray, torch) loads when it runs

    result = export_pairs(cfg)
    return f"export: {result.rows} pairs in {result.seconds:.1f}s"


def run_export_lora(cfg, args) -> str:
    from hgdpo.models.kohya import export  # late: a stage's work (Ray, torch) loads when it runs

    files = export(cfg)
    return f"export: {cfg.adapter} written as {cfg.format} LoRA to {cfg.output} ({len(files)} file(s))"


def parser(name: str, doc: str | None = None) -> argparse.ArgumentParser:
    """The command line of stage ``name``: its description (``doc``'s first line, else the stage's
    summary), ``--config``, the overrides, its flags, and every setting in ``--help``."""
    stage = STAGES[name]
    out = argparse.ArgumentParser(prog=f"hgdpo {name}", description=(doc or stage.summary).splitlines()[0],
                                  epilog="settings:\n" + describe(stage.config_class()),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    out.add_argument("--config", help="YAML file of settings")
    out.add_argument("overrides", nargs="*", help="key=value settings (section.key=value for a stage's section) "
                                                  "that override the file")
    for flag, text in stage.flags:
        out.add_argument(flag, action="store_true", help=text)
    return out


def main(name: str, argv: list[str] | None = None, doc: str | None = None,
         report: Callable[[str], None] = print) -> int:
    """Run stage ``name`` with ``argv``: 0 done, 2 bad input, 1 failure."""
    args = parser(name, doc).parse_intermixed_args(argv)
    stage = STAGES[name]
    try:
        quiet_libraries()
        cfg = load_config(stage.config_class(), args.config, args.overrides)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with log_file(name, cfg):
        return _run(name, stage, cfg, args, report)


def _run(name: str, stage: Stage, cfg: Any, args: argparse.Namespace, report: Callable[[str], None]) -> int:
    try:
        line = stage.run(cfg, args)
        if line:
            report(line)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # a failure, not bad input: the traceback is what a person needs
        traceback.print_exc()
        print(f"error: {name} failed (above); rerun the same command to resume from what is finished",
              file=sys.stderr)
        return 1
    return 0


LOGGED = ("run",)  # stages whose output folder holds other stages' folders: their log goes beside them


class _LogCopy:
    """The job's log file: text is held until the stage has made its output folder (so a run refused before
    any work leaves nothing behind), then written there and flushed line by line."""

    def __init__(self, output: Path, name: str):
        self.path = output / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
        self._output, self._held, self._file = output, [], None

    def write(self, text: str) -> None:
        if self._file is None:
            self._held.append(text)
            if not self._output.is_dir():
                return
            self.path.parent.mkdir(exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            text, self._held = "".join(self._held), []
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Tee:
    """A text stream that also writes to ``copy``; everything else is the stream's."""

    def __init__(self, stream, copy: _LogCopy):
        self._stream, self._copy = stream, copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def log_file(name: str, cfg: Any) -> Iterator[_LogCopy | None]:
    """For the ``LOGGED`` stages on a local output, everything the job prints (its own lines, its
    warnings and tracebacks, what Ray forwards from its workers) also goes to
    ``<output>/logs/<stage>-<UTC time>.log`` once the output folder exists; the console stays as it is."""
    if name not in LOGGED or not is_local(cfg.output):
        yield None
        return
    copy = _LogCopy(Path(absolute(cfg.output)), name)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, copy), _Tee(sys.stderr, copy)
    try:
        yield copy
    finally:
        sys.stdout, sys.stderr = streams
        copy.close()


def main_with_steps(name: str, argv: list[str] | None = None, doc: str | None = None) -> int:
    """Run step ``argv[0]`` of stage ``name`` (``STEPS``) with the rest of ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = STEPS[name]
    if not argv or argv[0] not in steps:
        print(f"usage: hgdpo {name} {{{','.join(steps)}}} [--config FILE] [key=value ...]\n"
              + "\n".join(f"  {step:8s} {STAGES[f'{name} {step}'].summary}" for step in steps), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return main(f"{name} {argv[0]}", argv[1:], doc=STAGES[f"{name} {argv[0]}"].summary)
