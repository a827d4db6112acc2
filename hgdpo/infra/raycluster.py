"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from hgdpo.infra.locations import is_local


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (set by ``ray job submit``), else start Ray locally.

    A local Ray gets no dashboard (it costs ~1 GiB and a port); a cluster keeps its own.
    """
    import ray  # late: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX (set by hgdpo.infra.quiet) when imported

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own INFO lines ("Started a local Ray instance", "Connecting to existing Ray cluster") stay out of the
    # job's output; its warnings and errors do not.
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HGDPO_")}})


def node_count() -> int:
    """Alive nodes of the Ray cluster this job runs on: connects when the job was submitted to one
    (``$RAY_ADDRESS``) or Ray is already up; a job that would start Ray itself runs on one node."""
    import ray  # late: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX (set by hgdpo.infra.quiet) when imported

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return 1
    ensure_ray()
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def warn_if_not_shared(location: str, setting: str, log=print) -> None:
    """A local path on a cluster of several nodes works only on a disk every node mounts at that path."""
    if not is_local(location):
        return
    nodes = node_count()
    if nodes > 1:
        log(f"warning: {setting}={location} is a local path and the Ray cluster has {nodes} nodes: every node "
            f"must see it at that path (a shared mount), or use object storage (s3://bucket/prefix)")


class TorchThread:
    """One thread of its own for a Ray Data actor's torch work: its loading and every batch.

    Ray Data builds an actor's UDF on the actor's main thread and calls it from another (the
    single-threaded wrapper of ``ActorPoolStrategy``). torch's OpenMP (libgomp) gives each thread
    that starts parallel work a thread pool of its own, and with two pools of two threads on two
    cores libgomp stops spinning at its barriers and sleeps on a futex: a pool prompt took 1.5 s
    there against 0.74 s on one thread (benchmarks/README.md, ``job1``). Running both on this
    thread keeps one pool.
    """

    def __init__(self, name: str):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the thread; its result (or its exception)."""
        return self._thread.submit(fn, *args, **kwargs).result()
