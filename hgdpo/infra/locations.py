"""Locations: where a stage's files are, as strings, local paths and object-store URIs alike.

A *location* is a string: a local path (relative paths and ``~`` allowed) or a URI that pyarrow
resolves to a filesystem (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``,
``file:///...``). These functions compute with the strings alone (no store is asked, and pyarrow is
not imported); ``hgdpo.infra.storage`` reads and writes the files.

**Credentials** come from the standard environment of each process (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an
S3-compatible store, an instance profile; ``GOOGLE_APPLICATION_CREDENTIALS``), never from a
location: a URI holding a key (``s3://KEY:SECRET@bucket``, ``?secret_key=``) is refused (``check_uri``),
so no config, output or log line can carry one.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

from hgdpo.errors import HgdpoError

CREDENTIAL_QUERY = ("access_key", "secret_key", "session_token")


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def is_local(location: str | os.PathLike) -> bool:
    """On this machine's disk: a path or a ``file://`` URI (other nodes see it only on a shared mount)."""
    return not is_uri(location) or os.fspath(location).startswith("file://")


def absolute(location: str | os.PathLike) -> str:
    """A URI unchanged; a local path made absolute (what a job records, and what Ray workers get)."""
    location = os.fspath(location)
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def _with_path(uri: str, edit: Callable[[str], str]) -> str:
    """``uri`` with its path edited, its scheme, bucket and query (``?endpoint_override=...``) kept."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=edit(parts.path.rstrip("/"))))


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...``; a URI stays a URI (``Path`` would fold ``s3://`` into ``s3:/``)."""
    location = os.fspath(location)
    if is_uri(location):
        return _with_path(location, lambda path: posixpath.join(path or "/", *parts))
    return os.path.join(location, *parts)


def name(location: str | os.PathLike) -> str:
    if is_uri(location):
        return posixpath.basename(urlsplit(os.fspath(location)).path.rstrip("/"))
    return Path(location).name


def parent(location: str | os.PathLike) -> str:
    location = os.fspath(location)
    if is_uri(location):
        return _with_path(location, lambda path: posixpath.dirname(path).rstrip("/"))
    return str(Path(location).parent)


def check_uri(location: str, setting: str) -> None:
    """Refuse a location that carries credentials: they would be copied into configs, outputs and logs."""
    if not is_uri(location):
        return
    parts = urlsplit(location)
    query = parse_qs(parts.query)
    if "@" in parts.netloc or any(key in query for key in CREDENTIAL_QUERY):
        raise HgdpoError(f"{setting}: credentials inside the URI are refused (they would be written into "
                         f"configs, outputs and logs); give them in the environment instead "
                         f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or GOOGLE_APPLICATION_CREDENTIALS)")


def check_tracking_uri(uri: str | None, setting: str) -> None:
    """Refuse a tracking URI holding a password: configs are written into outputs and MLflow."""
    if uri and urlsplit(uri).password is not None:
        raise HgdpoError(f"{setting}: a password inside the tracking URI is refused (it would be written into "
                         f"outputs and MLflow parameters); give MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                         f"in the environment instead")
