"""The settings of ``hgdpo replicate`` (``jobs/replicate.py``): a run's sections, and what the replication adds.

Apart from the job (``hgdpo.replication.replicate``), so that reading them (``--help``, a config file) loads
neither Ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hgdpo.config.core import doc
from hgdpo.errors import ConfigError
from hgdpo.replication.design import POOL_SIZES, trials
from hgdpo.run import RunConfig


@dataclass
class ReplicateConfig(RunConfig):
    """The world's versions of the paper's Tables 1, 2, 3, 5 and 6 (and Fig. 5a) on one pool."""

    SECTION = "replicate"

    output: str = doc("Folder or storage URI of the replication: pool/, public/ (Table 1's public set and its "
                      "pools), sweep/, agreement.json and (by default) the report are written inside it.")
    name: str = doc("Name of the replication's sweep (its MLflow parent run).", "replicate")
    report: str | None = doc("Where the Markdown report is written (its pictures beside it); default "
                             "<output>/replication.md.", None)
    max_concurrent_trials: int | None = doc("Trials at once (default: as many as fit the cluster).", None)
    notes: str | None = doc("A Markdown file of what people read in the measurements, included in the report "
                            "under 'What the measurements say' (the rest of the report is made from the runs).", None)
    run: bool = doc("Build the pools and run the unfinished trials; false: only write the report from what is "
                    "finished (the rest marked unfinished).", True)
    only: list[str] = doc("Run only these trials (names as in the report, e.g. [hgdpo, n=2]); default: all. "
                          "The report marks what the missing trials would have measured as '-'.", [])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool.get("images_per_prompt", 20) < max(POOL_SIZES):
            raise ConfigError(f"replicate.pool.images_per_prompt: the tables need N >= {max(POOL_SIZES)}")
        if self.notes is not None and not Path(self.notes).is_file():
            raise ConfigError(f"replicate.notes: {self.notes} is not a file")
        known = [t["name"] for t in trials(1, self.output)]
        for i, name in enumerate(self.only):
            if name not in known:
                raise ConfigError(f"replicate.only[{i}]: no trial {name!r}; trials: {', '.join(known)}")

    def selected(self, name: str) -> bool:
        """Whether trial ``name`` is run (and reported): every trial unless ``only`` names some."""
        return not self.only or name in self.only
