"""Secrets never reach a tracking store: redaction of params, tags, URIs and free text before they are logged.

Three rules, applied together by `redact_params` / `redact_text`:

1. **By key.** A key whose name has a secret word as one of its parts (`hub_token`, `HF_TOKEN`, `api-key`,
   `db.password`, `aws_secret_access_key`, `Authorization`) has its value replaced. Parts are split on `.`, `_`,
   `-`, `/` and camelCase, so `tokenize.max_length`, `max_new_tokens` and `evaluate.passkey.trials` stay visible:
   only the exact words in `SECRET_WORDS` count (`token`, not `tokens` or `tokenize`).
2. **By value shape.** Well-known credential formats (Hugging Face `hf_…`, OpenAI-style `sk-…`, GitHub `ghp_…`,
   AWS access key ids, JWTs, `Bearer …`) and the password part of `scheme://user:password@host` URLs.
3. **By environment.** The value of every environment variable whose *name* is secret by rule 1 (`HF_TOKEN`,
   `MLFLOW_TRACKING_PASSWORD`, `AWS_SECRET_ACCESS_KEY`, ...) is replaced wherever it appears in a value, so a token
   pasted into a path or a config value is caught too.

This module imports nothing heavy; `orca8k.tracking` runs everything it logs through it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***REDACTED***"

SECRET_WORDS = frozenset(
    {
        "token", "secret", "password", "passwd", "passphrase", "apikey", "key", "credential", "credentials",
        "auth", "authorization", "cookie", "private",
    }
)
# not `pwd` (the shell's PWD is the working directory) nor `session` (DBUS_SESSION_BUS_ADDRESS): both would redact
# ordinary paths everywhere.
_SPLIT = re.compile(r"[._\-/\s:]+|(?<=[a-z0-9])(?=[A-Z])")

_VALUE_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),                      # Hugging Face user access token
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}\b"),                   # OpenAI-style secret key
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),               # GitHub tokens
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                # AWS access key id
    re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"),  # JWT
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]{8,}"),          # Authorization header value
)
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")
_MIN_ENV_SECRET_CHARS = 6  # shorter env values ("1", "true") would redact innocent text


def key_parts(key: str) -> list[str]:
    """Lower-case words of a key: `hubToken` → [hub, token]; `data.sources.orca-chat.fraction` → 5 parts."""
    return [p.lower() for p in _SPLIT.split(key) if p]


def is_secret_key(key: str) -> bool:
    """True when one word of `key` is a secret word (`HF_TOKEN`, `db.password`), False for `max_new_tokens`."""
    return any(part in SECRET_WORDS for part in key_parts(key))


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables (rule 3), longest first, at least 6 characters each."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_key(k) and v and len(v) >= _MIN_ENV_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, extra_secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> str:
    """Replace credential-shaped substrings, URL passwords and known secret values in `text`.

    Args:
        text: any string about to be logged (a param value, a tag, a URI, a file's content).
        extra_secrets: further literal values to remove (e.g. collected from secret-named params).
        environ: the environment to take rule-3 values from (default `os.environ`).

    Returns:
        The text with each secret replaced by `***REDACTED***`.
    """
    if not text:
        return text
    for secret in [*sorted(set(extra_secrets), key=len, reverse=True), *env_secrets(environ)]:
        if secret and len(secret) >= _MIN_ENV_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    for pattern in _VALUE_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def redact_uri(uri: str) -> str:
    """A tracking URI safe to write into files and logs (`http://u:pw@host` → `http://u:***REDACTED***@host`)."""
    return redact_text(uri)


def redact_params(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Redact a flat mapping (params or tags): secret keys lose their value, other values are scrubbed as text.

    Values that are not strings are kept as they are unless their key is secret (numbers carry no secrets).

    Returns:
        A new dict with the same keys.
    """
    secret_values = [str(v) for k, v in params.items() if is_secret_key(k) and v not in (None, "")]
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = redact_text(value, secret_values, environ)
        else:
            out[key] = value
    return out


def redact_tree(data: Any, environ: Mapping[str, str] | None = None, _key: str = "") -> Any:
    """Redact a nested structure (a resolved config as plain data) the same way, keeping its shape."""
    if isinstance(data, Mapping):
        return {k: redact_tree(v, environ, str(k)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact_tree(v, environ, _key) for v in data]
    if _key and is_secret_key(_key) and data not in (None, ""):
        return REDACTED
    if isinstance(data, str):
        return redact_text(data, environ=environ)
    return data


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [1, 2]}` → `{"a.b": 1, "c": [1, 2]}` (lists stay values; empty dicts are kept)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out
