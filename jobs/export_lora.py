"""Export a trained adapter for other tools: diffusers LoRA (a folder) or kohya LoRA (one .safetensors file).

The kohya file is what AUTOMATIC1111, ComfyUI, Forge and kohya's scripts load (`lora_unet_*` keys,
each layer's `alpha` the adapter's real lora_alpha; see `hgdpo/models/kohya.py`):

    python jobs/export_lora.py adapter=runs/demo/train/adapter format=kohya output=hgdpo-demo.safetensors
    python jobs/export_lora.py adapter=s3://bucket/runs/dpo/adapter format=kohya dtype=float16 \\
        output=s3://bucket/loras/dpo.safetensors
    python jobs/export_lora.py adapter=runs/dpo/adapter output=exported/dpo      # diffusers format (default)

On a Ray cluster (no GPU needed; storage URIs as above):

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/export_lora.py --config export.yaml

An existing output is refused unless `overwrite=true`. Exit status 0 on success, 2 on bad input.
Settings: `python jobs/export_lora.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("export-lora", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
