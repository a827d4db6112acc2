"""Failed storage requests in words: what went wrong, and the setting and location to check."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from hgdpo.errors import HgdpoError

CREDENTIAL_HINT = ("check the credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                   "AWS_SESSION_TOKEN / AWS_PROFILE, or GOOGLE_APPLICATION_CREDENTIALS)")


def describe_error(err: Exception) -> str:
    """What went wrong with a storage request, in words, with the setting to check."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or ("BUCKET" in upper and ("NOT FOUND" in upper or "DOES NOT EXIST" in upper)):
        return f"the bucket does not exist ({text})"
    if any(s in upper for s in ("ACCESS_DENIED", "ACCESSDENIED", "FORBIDDEN", "INVALIDACCESSKEYID",
                                "SIGNATURE", "HTTP STATUS 403", "CREDENTIALS")):
        return f"access denied: {CREDENTIAL_HINT} ({text})"
    if any(s in upper for s in ("NETWORK_CONNECTION", "COULD NOT CONNECT", "CURLCODE", "COULD NOT RESOLVE",
                                "TIMED OUT", "CONNECTION REFUSED")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        where = f" (AWS_ENDPOINT_URL={endpoint})" if endpoint else ""
        return f"cannot reach the store's endpoint{where} ({text})"
    return f"{CREDENTIAL_HINT}, the endpoint and the bucket ({text})"


@contextlib.contextmanager
def errors(setting: str, location: str) -> Iterator[None]:
    """Turn a failed storage request into an error naming the setting and the location."""
    try:
        yield
    except HgdpoError:
        raise
    except (OSError, ValueError) as err:
        raise HgdpoError(f"{setting}: {location}: {describe_error(err)}") from None
