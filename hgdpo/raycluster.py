"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (set by ``ray job submit``), else start Ray locally.

    A local Ray gets no dashboard (it costs ~1 GiB and a port); a cluster keeps its own.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HGDPO_")}})
