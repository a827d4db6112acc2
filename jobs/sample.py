"""Sample images of prompts from a model, with an HG-DPO adapter at weight alpha and optionally LAN.

Runs in-process (no Ray); the embedded default model when none is named:

    python jobs/sample.py prompts=prompts.txt output=samples/base
    python jobs/sample.py --config sample.yaml adapter=runs/dpo/adapter alpha=0.5 output=samples/dpo
    python jobs/sample.py --config sample.yaml adapter=runs/dpo/adapter lan=true output=samples/dpo-lan

On a Ray cluster (one GPU):

    ray job submit --address http://HEAD:8265 --working-dir . --entrypoint-num-gpus 1 -- \\
        python jobs/sample.py --config sample.yaml

Image k of prompt p is `<output>/<prompt id>_<k>.png`, from the seed derived from (seed, prompt id, k)
as in the pool, so two runs that differ only in adapter, alpha or lan compare image for image.
`samples.json` (config, versions, files with prompt and seed) is written last: a folder without it
is unfinished. Rerunning a finished output with the same settings does nothing.
Settings: `python jobs/sample.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("sample", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
