"""Scorers on a transformers CLIP model: where the model and its processor come from (``embedded``, a
folder or a hub id), their cheap check, and their loading through ``hgdpo.models.loading``."""

from __future__ import annotations

import json
from pathlib import Path

from hgdpo.errors import HgdpoError
from hgdpo.models import embedded
from hgdpo.models import loading as models
from hgdpo.models.loading import HUB_ID
from hgdpo.scorers.base import Scorer, ScorerError, ScorerSpec


def clip_location(scorer: str, field: str, name: str, *, processor_only: bool = False) -> str:
    """``embedded``, a transformers CLIP folder, or a hub id -> the folder path or the hub id."""
    if name == embedded.EMBEDDED:
        return str(embedded.scorer_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if processor_only:
            if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
                raise ScorerError(scorer, field, f"{path} is not a CLIP processor folder (no processor_config.json "
                                                 f"or preprocessor_config.json)")
            return str(path.resolve())
        config = path / "config.json"
        if not config.is_file():
            raise ScorerError(scorer, field, f"{path} is not a transformers model folder (no config.json)")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ScorerError(scorer, field, f"could not load {config}: not a model config ({err})") from None
        if model_type != "clip":
            raise ScorerError(scorer, field, f"{path} holds a {model_type!r} model, not CLIP (model_type in "
                                             f"config.json)")
        return str(path.resolve())
    if path.exists():
        raise ScorerError(scorer, field, f"{path} is a file; a CLIP model folder or a hub id is expected")
    if HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    raise ScorerError(scorer, field, f"{name} does not exist (expected `embedded`, a CLIP model folder or a hub id)")


def check_clip(scorer: str, model_loc: str, proc_loc: str, allow_pickle: bool) -> None:
    """The CLIP model's config and its processor load (cheap; configs and tokenizer files only)."""
    try:
        models.check_scorer(model_loc, proc_loc, allow_pickle=allow_pickle)
    except HgdpoError as err:  # it names the field itself (scorer_model, scorer_processor)
        raise ScorerError(scorer, None, str(err)) from None


def load_clip(scorer: str, model_loc: str, proc_loc: str, allow_pickle: bool, device: str, dtype=None,
              attention: str | None = None):
    """``(processor, CLIPModel)`` through ``hgdpo.models.loading.load_scorer``."""
    try:
        return models.load_scorer(model_loc, proc_loc, allow_pickle=allow_pickle, dtype=dtype, device=device,
                                  attn_implementation=attention)
    except HgdpoError as err:
        raise ScorerError(scorer, None, str(err)) from None


class ClipModelScorer(Scorer):
    """A scorer that is a CLIP model and its processor (``model``: `embedded`, a folder or a hub id;
    ``processor``: a processor folder or hub id, by default the model's own)."""

    default_model = embedded.EMBEDDED

    def __init__(self, processor, model):
        self.processor, self.model = processor, model

    @classmethod
    def locations(cls, spec: ScorerSpec) -> tuple[str, str]:
        """The model's and the processor's folder or hub id."""
        model_loc = clip_location(cls.name, "model", cls.model_of(spec))
        proc = cls.processor_of(spec)
        proc_loc = model_loc if proc is None else clip_location(cls.name, "processor", proc, processor_only=True)
        return model_loc, proc_loc

    @classmethod
    def check(cls, spec: ScorerSpec, allow_pickle: bool = False) -> None:
        check_clip(cls.name, *cls.locations(spec), allow_pickle)

    @classmethod
    def load(cls, spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
             attention: str | None = None) -> ClipModelScorer:
        return cls(*load_clip(cls.name, *cls.locations(spec), allow_pickle, device, dtype, attention))
