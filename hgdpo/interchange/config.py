"""The configurations of preference-data import (``jobs/import_pairs.py``) and export (``jobs/export_pairs.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hgdpo.config.core import (
    check_actors,
    check_fields,
    check_image_size,
    check_locations,
    doc,
    output_settings,
    rule_fields,
)
from hgdpo.config.sections import BaseModel, Dtype, Encoders
from hgdpo.errors import ConfigError

# The "(H)" subset of the paper's Table 1: pairs whose caption names a person. Whole words, case-insensitive
# (plural and possessive forms are listed or matched by the trailing "s" / "'s" rule in hgdpo.interchange.selection).
PEOPLE_KEYWORDS = [
    "person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "baby",
    "guy", "lady", "gentleman", "human", "humans", "face", "portrait", "selfie", "teenager", "adult",
    "mother", "father", "mom", "dad", "son", "daughter", "brother", "sister", "family", "couple", "bride",
    "groom", "king", "queen", "prince", "princess", "soldier", "warrior", "knight", "wizard", "witch",
    "girlfriend", "boyfriend", "wife", "husband", "actor", "actress", "athlete", "player", "dancer",
    "singer", "musician", "chef", "doctor", "nurse", "police", "policeman", "firefighter", "astronaut",
    "student", "teacher", "worker", "farmer", "cowboy", "pirate", "ninja", "samurai", "monk", "priest",
    "elf", "superhero", "he", "she", "him", "her", "his", "hers",
]

@dataclass(kw_only=True)
class ImportConfig(Encoders, BaseModel):
    """Import a public preference set (Pick-a-Pic v2, HPDv2, or an hgdpo export) as a pool of pairs (N = 2),
    VAE-encoded by `model`, the model that trains on them."""

    SECTION = "import"

    source: str = doc("The preference set: a Pick-a-Pic v2 parquet file or a folder of them (our export too), or an "
                      "HPDv2 JSON / JSON-lines file.", resume=True)
    output: str = doc("Folder or storage URI the imported pool is written to.")
    format: Literal["auto", "pickapic", "hpdv2"] = doc(
        "Format of `source`: `auto` goes by its suffix (.json/.jsonl: hpdv2; .parquet or a folder: pickapic).", "auto",
        resume=True)
    images: str | None = doc("HPDv2: the folder its `file_path` entries are relative to (default: the JSON's folder).",
                             None, resume=True)
    width: int | None = doc("Width the images are resized and centre-cropped to; default: the model's native size.",
                            None, resume=True)
    height: int | None = doc("Height the images are resized and centre-cropped to; default: the model's native size.",
                             None, resume=True)
    subset: Literal["all", "people"] = doc(
        "`people`: keep only pairs whose caption names a person (`people_keywords`): the paper's \"(H)\" sets.", "all",
        resume=True)
    people_keywords: list[str] = doc("Whole words (case-insensitive; plurals and 's too) that make a caption one of "
                                     "people (the default list is in hgdpo/interchange/config.py).", PEOPLE_KEYWORDS,
                                     resume=True)
    id_column: str | None = doc("Column/field of a stable pair id (default: prompt_id, else ranking_id, else the "
                                "row's position in the source).", None, resume=True)
    max_pairs: int | None = doc("Keep only the first this many pairs (after dropping ties and filtering).", None,
                                minimum=1, resume=True)
    exclude_rows: list[int] = doc("Source rows (0-based over the whole source, as error messages name them) left out, "
                                  "e.g. rows whose image is undecodable.", [], resume=True)
    dtype: Dtype = doc("VAE precision: `auto` is float16 on CUDA and float32 on CPU.", "auto", resume=True)
    encode_batch: int = doc("Images per VAE encode call (a pair's two images go in the same call).", 16, minimum=1)
    rows_per_file: int = doc("Pairs per parquet part of the imported pool.", 64, minimum=1)

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.source:
            raise ConfigError(f"{s}.source: required (a Pick-a-Pic parquet file or folder, or an HPDv2 JSON)")
        if not self.output:
            raise ConfigError(f"{s}.output: required (where to write the imported pool)")
        check_fields(self)
        check_image_size(self)
        if self.subset == "people" and not self.people_keywords:
            raise ConfigError(f"{s}.people_keywords: empty; subset=people needs at least one keyword")
        if any(r < 0 for r in self.exclude_rows):
            raise ConfigError(f"{s}.exclude_rows: rows are 0-based positions (got {min(self.exclude_rows)})")
        check_actors(self, "encoder")
        check_locations(self, "source", "output", "images")

    def resolved_format(self) -> str:
        """``pickapic`` or ``hpdv2``: the configured format, or the one ``source``'s suffix gives."""
        if self.format != "auto":
            return self.format
        lower = self.source.lower().rstrip("/")
        return "hpdv2" if lower.endswith((".json", ".jsonl")) else "pickapic"

    def data_settings(self) -> dict:
        """The settings that determine the import's content (declared ``resume``: ``IMPORT_DATA_FIELDS``); a rerun
        that differs in one of them is refused."""
        return output_settings(self)


IMPORT_DATA_FIELDS = rule_fields(ImportConfig, "resume")


@dataclass
class PairsExportConfig:
    """Export a pool's pairs as one Pick-a-Pic-style parquet file, for other Diffusion-DPO tools."""

    SECTION = "export"

    pool: str = doc("The pool to export (a finished pool: built, imported, or its oracle-ranked copy).")
    output: str = doc("The parquet file written (a local path or a storage URI), e.g. runs/export/pairs.parquet.")
    model_name: str | None = doc("What `model_0` / `model_1` say made the images; default: the pool's base model name.",
                                 None)
    row_group_rows: int = doc("Rows per parquet row group of the export (readers hold one at a time).", 64, minimum=1)

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.pool:
            raise ConfigError(f"{s}.pool: required (the pool to export)")
        if not self.output:
            raise ConfigError(f"{s}.output: required (the parquet file to write)")
        if not self.output.lower().endswith(".parquet"):
            raise ConfigError(f"{s}.output: must name a .parquet file (got {self.output!r})")
        check_fields(self)
        check_locations(self, "pool", "output")
