"""What MLflow may see: secrets masked in params, tags and warning lines.

No secret reaches MLflow: config keys named like key/secret/token/password, user:pass@
in URLs, secret-looking query parameters and the values of secret environment
variables are replaced by `***`. Needs no MLflow itself, so logs and commands that do
not track can use it too.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sg2dist.config import Config

REDACTED = "***"
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|auth", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
_SECRET_QUERY = re.compile(
    r"(?<=[?&])([^=&\s]*(?:key|secret|token|passw|signature|credential)[^=&\s]*=)[^&\s]+",
    re.IGNORECASE,
)


def _secret_env_values() -> list[str]:
    """Values of environment variables named like secrets (AWS_SECRET_ACCESS_KEY, ...)."""
    return [
        value for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= 8
    ]


def redact_text(text: str) -> str:
    """`text` with URL credentials, secret query values and secret env values masked."""
    text = _URL_USERINFO.sub(REDACTED + "@", text)
    text = _SECRET_QUERY.sub(r"\1" + REDACTED, text)
    for secret in _secret_env_values():
        text = text.replace(secret, REDACTED)
    return text


def redact(key: str, value: Any) -> str:
    """The string MLflow may see for a param or tag `key` = `value`."""
    if _SECRET_NAME.search(key.rsplit(".", 1)[-1]) and value not in ("", None):
        return REDACTED
    return redact_text(str(value))


def flatten_config(cfg: Config) -> dict[str, str]:
    """{'train.batch': '32', ...}: one MLflow param per config key, secrets redacted."""
    params: dict[str, str] = {}
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            params[key] = redact(key, value)
    return params
