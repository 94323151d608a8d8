"""What a secret looks like. The ledger is reviewed in pull requests, so none may enter it.

Two checks, applied by `envelope.py` to every event however it arrives (publish, HTTP,
handler follow-ups, import, verify): a payload key that names a secret (`password`,
`github_token`, `apiKey`, ...) holding a real value, and a string shaped like a known
credential wherever it appears: a payload key or value at any depth, or any string field
of the envelope (`source`, `subject`, `partition_key`, `topic`, ...).
"""

from __future__ import annotations

import re
from functools import lru_cache

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

# Each credential shape: the literal it always contains (its anchor), how far before the
# anchor the shape starts, and the shape itself, matched at that position. One C-level
# search for any anchor clears most strings; a shape is tried only where its anchor is.
_NOT_AFTER_TOKEN = r"(?<![A-Za-z0-9_-])"
_SHAPES: tuple[tuple[tuple[str, ...], int, str], ...] = (
    (
        ("AKIA", "ASIA", "ABIA", "ACCA"),
        0,
        r"(?<![A-Za-z0-9])A[KSBC][IC]A[0-9A-Z]{16}(?![A-Za-z0-9])",
    ),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), 0, _NOT_AFTER_TOKEN + r"gh[pousr]_[A-Za-z0-9]{36,}"),
    (("github_pat_",), 0, _NOT_AFTER_TOKEN + r"github_pat_[A-Za-z0-9_]{50,}"),
    (("glpat-",), 0, _NOT_AFTER_TOKEN + r"glpat-[A-Za-z0-9_-]{20,}"),
    (("xoxa-", "xoxb-", "xoxp-", "xoxo-", "xoxs-", "xoxr-"), 0, r"xox[abposr]-[A-Za-z0-9-]{10,}"),
    (("hooks.slack.com/services/",), 0, r"hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/\w+"),
    (("_live_", "_test_"), 2, r"(?<![A-Za-z0-9])[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"),
    (("AIza",), 0, r"AIza[0-9A-Za-z_-]{35}"),
    (("sk-",), 0, _NOT_AFTER_TOKEN + r"sk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{32,}"),
    (("npm_",), 0, _NOT_AFTER_TOKEN + r"npm_[A-Za-z0-9]{36}"),
    (("pypi-AgE",), 0, r"pypi-AgE[A-Za-z0-9_-]{50,}"),
    (("SG.",), 0, r"SG\.[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{32,64}"),
    (("-----BEGIN ",), 0, r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY"),
    (("PuTTY-User-Key-File-",), 0, r"PuTTY-User-Key-File-\d+: *[a-z0-9-]+"),
    (("eyJ",), 0, r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    (("://",), 0, r"://[^/\s:@]*:[^/\s@]{3,}@"),  # a URL with a password
    (("Bearer ", "Basic "), 0, r"(?:Bearer|Basic) +[A-Za-z0-9._~+/=-]{20,}"),
)
_ANCHOR_RE = re.compile("|".join(re.escape(a) for anchors, _, _ in _SHAPES for a in anchors))
_SHAPE_FOR: dict[str, tuple[int, str]] = {
    anchor: (back, shape) for anchors, back, shape in _SHAPES for anchor in anchors
}
_MIN_SCANNED_LEN = 12  # shorter strings cannot hold any of the shapes above


def _normalise_key(key: str) -> str:
    return _SEP_RE.sub("_", _CAMEL_RE.sub(r"\1_\2", key).lower()).strip("_")


_SECRET_KEY_RE = re.compile(r"(?:^|_)(?:" + "|".join(_SECRET_KEY_ENDINGS) + r")$")


@lru_cache(maxsize=4096)  # payload keys repeat across events; values do not
def is_secret_key(key: str) -> bool:
    """`db_password`, `githubToken`, `API-Key`: a key that names a secret."""
    return _SECRET_KEY_RE.search(_normalise_key(key)) is not None


def is_placeholder(value: str) -> bool:
    """`***`, `<redacted>`, `${TOKEN}`, empty: stands in for a secret without holding one."""
    stripped = value.strip()
    return not stripped or _PLACEHOLDER_RE.match(stripped) is not None


def looks_like_credential(value: str) -> bool:
    """True when `value` contains a known credential shape (cloud keys, tokens, PEM, JWT,
    URL passwords, Authorization values)."""
    if len(value) < _MIN_SCANNED_LEN:
        return False
    found = _ANCHOR_RE.search(value)
    while found is not None:
        back, shape = _SHAPE_FOR[found.group()]
        start = found.start() - back
        # re caches compiled patterns; compiling all shapes up front cost every process ~3 ms
        if start >= 0 and re.compile(shape).match(value, start):
            return True
        found = _ANCHOR_RE.search(value, found.start() + 1)
    return False
