"""What ``hgdpo verify`` and ``hgdpo duel`` do: read what the jobs wrote and report on it (see ``hgdpo.cli``).

Apart from the command line, so that ``hgdpo --help`` does not import pyarrow and the report's tables.
"""

from __future__ import annotations

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.pool import store as pool
from hgdpo.report.duel import compare_outputs
from hgdpo.report.tables import format_comparisons


def verify_pool(location: str) -> str:
    """``hgdpo verify``: the pool's summary when every part is as its manifest records it."""
    storage.check_reachable(location, "pool")
    with storage.errors("pool", location):
        report = pool.verify(location)
    checked = "size, sha256, rows and prompt ids" if report["checksums"] else \
        "rows and prompt ids (its manifest predates checksums: rerun the pool job to record them)"
    return (f"pool: {location}: {report['rows']} prompts in {report['parts']} parts ({report['bytes'] / 1e6:.1f} MB), "
            f"every part's {checked} as recorded")


def duel_evaluations(a: str, b: str) -> str:
    """``hgdpo duel``: the head-to-head tables of evaluation ``a``'s A images against evaluation ``b``'s, on the
    scorers both have, with ``a``'s bootstrap settings."""
    configs = []
    for setting, location in (("duel A", a), ("duel B", b)):
        storage.check_reachable(location, setting)
        report = storage.join(location, "report.json")
        if not storage.exists(report):
            raise HgdpoError(f"{setting}: {location} is not a finished evaluation (no report.json)")
        with storage.errors(setting, location):
            configs.append(storage.read_json(report, "evaluation report")["config"])
    scorers = [s for s in configs[0]["scorers"] if s in configs[1]["scorers"]]
    if not scorers:
        raise HgdpoError(f"duel: the evaluations have no scorer in common ({configs[0]['scorers']} and "
                         f"{configs[1]['scorers']})")
    ev = configs[0]
    with storage.errors("duel", f"{a}, {b}"):
        found = compare_outputs(a, b, scorers, resamples=ev["bootstrap"], confidence=ev["confidence"], seed=ev["seed"])
    if found is None:
        raise HgdpoError(f"duel: {a} and {b} were not made on the same prompts and seeds (prompt ids, image "
                         "indices and seeds must match one to one)")
    return format_comparisons([(a, b, *found)], scorers)
