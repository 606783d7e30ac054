"""Keeping secrets out of MLflow, run directories and the terminal.

A name looks like a secret when one of its words (split at ``.``, ``_``, ``-`` and case changes) is
``password``, ``passwd``, ``secret``, ``credential(s)``, ``apikey`` or ``auth``, when it ends in ``token``,
``key`` or ``sig``/``signature``, or when it holds ``api key``, ``access key``, ``private key`` or
``session token``. So ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD`` and
``storage.api_key`` are secrets, while ``model.pad_token_id`` and ``preprocess.tokenizer_threads`` are not.

What is redacted, and where it is used:

- :func:`redact_params`: parameter values whose names look like secrets become ``***`` (MLflow params);
- :func:`redact_uri`: the password of ``scheme://user:password@host`` and secret-named query parameters
  (``?token=...``, ``&sig=...``) in any text become ``***`` (URIs in messages);
- :func:`redact_text`: both, and also the value of every environment variable whose name looks like a
  secret, wherever it appears (every error line the commands print goes through it).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
_WORDS = frozenset({"password", "passwd", "secret", "secrets", "credential", "credentials", "apikey", "auth"})
_LAST_WORDS = frozenset({"token", "tokens", "key", "sig", "signature"})
_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("session", "token")})
_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)(?P<secret>[^\s/@]+)(?=@)")
_QUERY = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&;#\s]+)")
_MIN_ENV_SECRET = 6
"""Shorter environment values are not searched for in text (they would match ordinary words)."""


def is_secret_name(name: str) -> bool:
    """Whether a parameter, config key or environment variable name looks like it holds a secret."""
    words = [w.lower() for w in _SPLIT.split(name) if w]
    if not words:
        return False
    if _WORDS.intersection(words) or words[-1] in _LAST_WORDS:
        return True
    return any(pair in _PAIRS for pair in itertools.pairwise(words))


def redact_uri(text: str) -> str:
    """``text`` with the passwords of URIs (``scheme://user:password@host``) and the values of
    secret-named query parameters replaced by ``***``."""
    text = _USERINFO.sub(lambda m: m["head"] + REDACTED, text)
    return _QUERY.sub(lambda m: m["head"] + REDACTED if is_secret_name(m["name"]) else m[0], text)


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names look like secrets (long enough to search for)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)  # the longest first: one secret may contain another


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URI passwords, secret query parameters and secret environment values redacted."""
    text = redact_uri(text)
    for value in environment_secrets(environ):
        text = text.replace(value, REDACTED)
    return text


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameter values as strings: ``***`` for secret-looking names, URI passwords redacted in the rest."""
    return {
        key: REDACTED if is_secret_name(key) else redact_text(str(value)) for key, value in params.items()
    }
