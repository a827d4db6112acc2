"""The settings of each step of a user study (``jobs/study.py create|serve|results|export|raters``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hgdpo.config.core import doc
from hgdpo.errors import ConfigError

DB_DOC = ("Database: a file path (SQLite, WAL mode; `sqlite:///path` too) or `postgresql://user@host:port/name` "
          "(password from $PGPASSWORD or ~/.pgpass, never in the URL).")
QUESTIONS = {"naturalness": "Which image is more natural?",  # the paper's (App. E)
             "prompt_fidelity": "Which image matches the prompt better?"}
# Words that say what a question asks; one naming only the other kind is refused (its gold items would be wrong).
QUESTION_WORDS = {"naturalness": ("natural", "realistic", "realism", "photoreal", "artifact", "artefact"),
                  "prompt_fidelity": ("prompt", "caption", "match", "describ", "faithful")}


@dataclass
class CreateConfig:
    """A new study: its items from an evaluation's output or from a pool, its raters and their items."""

    SECTION = "study.create"

    db: str = doc(DB_DOC)
    source: str = doc("An evaluation's output folder (its scores.parquet: A vs B) or a pool (winner vs loser).")
    invites: str = doc("CSV file the rater and admin links are written to (mode 0600; they carry the tokens).")
    kind: Literal["auto", "evaluation", "pool"] = doc("What `source` is; `auto` looks for scores.parquet.", "auto")
    study: str | None = doc("Study id (letters, digits, - and _); default: derived from the source's name.", None)
    question_kind: Literal["naturalness", "prompt_fidelity"] = doc(
        "What raters judge; it decides the gold items, so each has a right answer: `naturalness`, an image "
        "against a visibly corrupted copy of itself (blocks scrambled, heavy noise); `prompt_fidelity`, the "
        "prompt's image against another prompt's.", "naturalness")
    question: str | None = doc("The question raters answer; none: the kind's (naturalness: \"Which image is more "
                               "natural?\", the paper's; prompt_fidelity: \"Which image matches the prompt "
                               "better?\"). One that asks about the other kind is refused.", None)
    items: int | None = doc("Number of pairs in the study, drawn at random (seeded) from the source; none: all.",
                            None)
    scorer: str | None = doc("Evaluation studies: the scorer whose scores are the AI feedback compared with people "
                             "(default `judge` if present, else the first in scores.parquet).", None)
    gold_items: int = doc("Attention checks shown to every rater, mixed among the pairs (see `question_kind`).", 2)
    raters: int = doc("Raters invited now (more later with `raters add=N`).", 3)
    items_per_rater: int | None = doc("Pairs each rater judges (spread evenly over the items); none: all.", None)
    seed: int = doc("Seed of the item draw, the gold items, the assignments and the sides shown.", 0)
    base_url: str = doc("Address the invite links start with (where `serve` is reached).", "http://127.0.0.1:8000")

    def __post_init__(self):
        if self.items is not None and self.items < 1:
            raise ConfigError(f"{self.SECTION}.items: must be at least 1 (got {self.items})")
        if self.gold_items < 0:
            raise ConfigError(f"{self.SECTION}.gold_items: must be 0 or more (got {self.gold_items})")
        if self.raters < 0:
            raise ConfigError(f"{self.SECTION}.raters: must be 0 or more (got {self.raters})")
        if self.items_per_rater is not None and self.items_per_rater < 1:
            raise ConfigError(f"{self.SECTION}.items_per_rater: must be at least 1 (got {self.items_per_rater})")
        if self.study is not None and not _valid_id(self.study):
            raise ConfigError(f"{self.SECTION}.study: {self.study!r} may hold only letters, digits, - and _ "
                              f"(at most 64)")
        if self.question is not None and not self.question.strip():
            raise ConfigError(f"{self.SECTION}.question: must not be empty")
        other = next(k for k in QUESTIONS if k != self.question_kind)
        words = self.question_text().lower()
        if (any(w in words for w in QUESTION_WORDS[other])
                and not any(w in words for w in QUESTION_WORDS[self.question_kind])):
            raise ConfigError(f"{self.SECTION}.question_kind: the question {self.question_text()!r} asks about "
                              f"{other}, but question_kind={self.question_kind!r} (its gold items would have no "
                              f"right answer); set question_kind={other} or change the question")

    def question_text(self) -> str:
        """The question shown to raters: ``question``, or the standard one of ``question_kind``."""
        return (self.question or QUESTIONS[self.question_kind]).strip()


@dataclass
class ServeConfig:
    """The web app on a real HTTP server (uvicorn)."""

    SECTION = "study.serve"

    db: str = doc(DB_DOC)
    host: str = doc("Address to bind; 127.0.0.1 keeps it on this machine (a team's server: put it behind TLS).",
                    "127.0.0.1")
    port: int = doc("Port to listen on (0: any free port).", 8000)
    max_body: int = doc("Largest request body accepted, in bytes (larger: 413).", 16384)
    secure_cookies: bool = doc("Mark the session cookies Secure (set when served over https).", False)


@dataclass
class ResultsConfig:
    """Human win rates, rater agreement, gold flags and AI-feedback agreement; files and MLflow."""

    SECTION = "study.results"

    db: str = doc(DB_DOC)
    study: str = doc("Study id (printed by `create`).")
    output: str = doc("Folder or storage URI for results.json, votes.parquet and votes.csv.")
    exclude_flagged: bool = doc("Leave out the votes of raters who failed gold items.", True)
    gold_pass: float = doc("Fraction of gold items a rater must answer right not to be flagged (a tie is wrong); "
                           "results warn when flagged raters cast over 20% of the votes on pairs.", 1.0)
    bootstrap: int = doc("Bootstrap resamples (over items) of the intervals.", 2000)
    confidence: float = doc("Confidence of the intervals.", 0.95)
    mlflow: bool = doc("Log the results as an MLflow run linked to the source's run.", True)
    mlflow_uri: str | None = doc("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db).", None)
    mlflow_experiment: str = doc("MLflow experiment name.", "hgdpo-study")

    def __post_init__(self):
        if not 0.0 <= self.gold_pass <= 1.0:
            raise ConfigError(f"{self.SECTION}.gold_pass: must be in [0, 1] (got {self.gold_pass})")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"{self.SECTION}.confidence: must be in (0, 1) (got {self.confidence})")
        if self.bootstrap < 1:
            raise ConfigError(f"{self.SECTION}.bootstrap: must be at least 1 (got {self.bootstrap})")


@dataclass
class ExportConfig:
    """The votes as a Pick-a-Pic-style preference set (caption, jpg_0, jpg_1, label_0) for training."""

    SECTION = "study.export"

    db: str = doc(DB_DOC)
    study: str = doc("Study id.")
    output: str = doc("Parquet file (path or storage URI) to write.")
    exclude_flagged: bool = doc("Leave out the votes of raters who failed gold items.", True)
    gold_pass: float = doc("Fraction of gold items a rater must answer right not to be flagged.", 1.0)
    ties: Literal["keep", "drop"] = doc("Keep tied votes (label_0 = 0.5) or drop them.", "keep")


@dataclass
class RatersConfig:
    """Invite more raters to a study, or revoke one."""

    SECTION = "study.raters"

    db: str = doc(DB_DOC)
    study: str = doc("Study id.")
    add: int = doc("Raters to invite (their links are appended to `invites`).", 0)
    revoke: str | None = doc("Name of a rater whose token stops working (their votes are kept).", None)
    invites: str | None = doc("CSV file the new links are written to (required with add).", None)
    base_url: str = doc("Address the invite links start with.", "http://127.0.0.1:8000")
    seed: int = doc("Seed of the new raters' assignments and sides.", 0)

    def __post_init__(self):
        if self.add < 0:
            raise ConfigError(f"{self.SECTION}.add: must be 0 or more (got {self.add})")
        if self.add and not self.invites:
            raise ConfigError(f"{self.SECTION}.invites: required with add (the new links are written there)")
        if not self.add and self.revoke is None:
            raise ConfigError(f"{self.SECTION}: nothing to do; give add=N or revoke=NAME")


def _valid_id(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c.isalnum() or c in "-_" for c in text) and text.isascii()
