"""Refuse payloads that carry credentials: the ledger is reviewed in public pull requests.

Two checks: a key that names a secret (`password`, `github_token`, `apiKey`, ...) holding a
real value, and a string value shaped like a known credential wherever it appears.
"""

from __future__ import annotations

import re
from typing import Any

# Words that make a key secret when they end it: `db_password`, `githubToken`, `api-key`.
# Plurals and counters (`max_tokens`, `token_count`) do not end in these and pass.
_SECRET_KEY_ENDINGS = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "private_key",
    "privatekey",
    "secret_key",
    "access_key",
    "authorization",
    "credential",
    "credentials",
    "client_secret",
    "session_key",
    "signing_key",
)
_CAMEL_RE = re.compile(r"([a-z0-9])([A-Z])")
_SEP_RE = re.compile(r"[^a-z0-9]+")

# Values that only stand in for a secret are allowed under secret keys.
_PLACEHOLDER_RE = re.compile(
    r"^(?:\*+|x+|redacted|<[^<>]*>|\$\{[^}]*\}|\$[A-Z_][A-Z0-9_]*|none|null|changeme|-+)$",
    re.IGNORECASE,
)

_VALUE_PATTERNS = (
    r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b",  # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub classic tokens
    r"\bgithub_pat_[A-Za-z0-9_]{50,}\b",  # GitHub fine-grained tokens
    r"\bglpat-[A-Za-z0-9_-]{20,}",  # GitLab personal access token
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack tokens
    r"hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+",  # Slack webhook
    r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe secret / restricted keys
    r"\bAIza[0-9A-Za-z_-]{35}",  # Google API key
    r"\bsk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{32,}",  # OpenAI / Anthropic keys
    r"\bnpm_[A-Za-z0-9]{36}\b",  # npm token
    r"\bpypi-AgE[A-Za-z0-9_-]{50,}",  # PyPI token
    r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b",  # SendGrid
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",  # PEM private keys
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
    r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]{3,}@",  # URL with a password
    r"\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{20,}",  # Authorization header values
)
_VALUE_RE = re.compile("|".join(f"(?:{p})" for p in _VALUE_PATTERNS))
_MIN_SCANNED_LEN = 12  # shorter strings cannot hold any of the shapes above


def _normalise_key(key: str) -> str:
    return _SEP_RE.sub("_", _CAMEL_RE.sub(r"\1_\2", key).lower()).strip("_")


def is_secret_key(key: str) -> bool:
    norm = _normalise_key(key)
    return any(norm == end or norm.endswith("_" + end) for end in _SECRET_KEY_ENDINGS)


def looks_like_credential(value: str) -> bool:
    return len(value) >= _MIN_SCANNED_LEN and _VALUE_RE.search(value) is not None


def find_secret(value: Any, path: str = "payload") -> str | None:
    """Return a description of the first secret found in `value`, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}"
            if (
                isinstance(item, str)
                and item.strip()
                and not _PLACEHOLDER_RE.match(item.strip())
                and is_secret_key(key)
            ):
                return f"{sub} is a secret-looking key holding a value"
            found = find_secret(item, sub)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_secret(item, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, str) and looks_like_credential(value):
        return f"{path} looks like a credential"
    return None
