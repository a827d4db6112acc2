"""The generator actor's torch work runs on one thread of its own, with the threads its CPUs allow.

Ray Data builds an actor's UDF on the actor's main thread and calls it from another thread. When the
model was loaded on one thread and run on another, torch's OpenMP kept two thread pools in the process,
and on two cores libgomp then sleeps at every barrier instead of spinning: ``make`` took twice as long
(benchmarks/README.md). These tests run ``RowMaker`` through the job's own actor stage
(``pool_builder.generator_stage``) and look at the threads from inside the actor.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from ray import cloudpickle

from hgdpo.pool.build import generator_stage
from hgdpo.pool.config import PoolConfig
from hgdpo.pool.generator import RowMaker

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ThreadProbe travels to the actor by value

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top"]


def _voluntary_switches() -> int:
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")).split()[1])


class ThreadProbe(RowMaker):
    """A RowMaker whose rows also say which threads loaded the model, were called by Ray Data and made
    the row, the torch threads seen where the row was made, and that thread's voluntary context
    switches while making it."""

    def _load(self, config, actor, log):
        self.load_thread = threading.get_native_id()
        super()._load(config, actor, log)

    def __call__(self, batch):
        out = super().__call__(batch)
        out["call_thread"] = np.asarray([threading.get_native_id()] * len(out["prompt_id"]))
        out["main_thread"] = np.asarray([threading.main_thread().native_id] * len(out["prompt_id"]))
        return out

    def _rows(self, batch):
        import torch

        before = _voluntary_switches()
        out = super()._rows(batch)
        n = len(out["prompt_id"])
        out.update(load_thread=np.asarray([self.load_thread] * n),
                   make_thread=np.asarray([threading.get_native_id()] * n),
                   torch_threads=np.asarray([torch.get_num_threads()] * n),
                   switches=np.asarray([(_voluntary_switches() - before) / n] * n))
        return out


def probe_rows(ray, tmp_path: Path, cpus: float) -> list[dict]:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = PoolConfig(prompts=str(tmp_path / "prompts.txt"), output=str(tmp_path / "pool"), images_per_prompt=4,
                     steps=6, generator_actors=1, generator_cpus=cpus)
    ds = ray.data.from_items([{"prompt_id": f"p{i}", "prompt_index": i, "prompt": p} for i, p in enumerate(PROMPTS)],
                             override_num_blocks=len(PROMPTS))
    return generator_stage(ds, cfg, ThreadProbe).take_all()


@pytest.mark.parametrize("cpus", [1.0, 2.0])
def test_the_actor_loads_and_makes_on_one_thread_of_its_own(ray_local, tmp_path, cpus):
    rows = probe_rows(ray_local, tmp_path, cpus)
    assert len(rows) == len(PROMPTS)
    threads = {(int(r["load_thread"]), int(r["make_thread"])) for r in rows}
    assert len(threads) == 1, f"one actor, one torch thread: {threads}"
    (load, make), = threads
    assert make == load  # the model runs on the thread that loaded it
    assert make not in {int(r["call_thread"]) for r in rows} | {int(r["main_thread"]) for r in rows}
    assert {int(r["torch_threads"]) for r in rows} == {int(cpus)}  # sampling.set_threads(generator_cpus)


def test_the_two_thread_actor_does_not_sleep_at_openmp_barriers(ray_local, tmp_path):
    """With a second OpenMP pool in the process, the making thread slept at every parallel region's
    barrier: about 1,400 voluntary context switches per prompt of this size (and 11,500 at the
    benchmark's); on one thread, a handful."""
    rows = probe_rows(ray_local, tmp_path, 2.0)
    assert np.median([float(r["switches"]) for r in rows]) < 150
