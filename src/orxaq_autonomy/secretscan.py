"""What a secret looks like. The ledger is reviewed in pull requests, so none may enter it.

Two checks, applied by `envelope.py` to every event however it arrives (publish, HTTP,
handler follow-ups, import, verify): a payload key that names a secret (`password`,
`github_token`, `db_pass`, ...) holding a real value, and a string shaped like a known
credential wherever it appears: a payload key or value at any depth, or any string field
of the envelope (`source`, `subject`, `partition_key`, `topic`, ...).

The credential shapes are detect-secrets' plugins (`secretrules.py`, generated from the
installed package) plus the mesh's own rules for kinds those plugins do not know yet
(Hugging Face, Vault, Databricks, DigitalOcean, Shopify, Doppler, Slack app tokens,
`curl -u`, unquoted AWS secret-key lines, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache, lru_cache

from .secretrules import RULES as DETECT_SECRETS_RULES

# Words that make a key secret when they end it: `db_password`, `githubToken`, `api-key`.
# Plurals and counters (`max_tokens`, `token_count`) do not end in these and pass.
_SECRET_KEY_ENDINGS = (
    "password",
    "passwd",
    "passphrase",
    "pass",
    "pwd",
    "pw",
    "secret",
    "token",
    "api_key",
    "apikey",
    "auth_key",
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

# Every rule belongs to a group that names the literals (anchors) one of which each of its
# matches contains. One C-level scan for all anchors clears most strings; a group's
# patterns run only on a string holding one of its anchors and at least its minimum length.
# Anchors are case-sensitive: the few case-blind rules list their spellings.
_DETECT_SECRETS_ANCHORS: dict[str, tuple[tuple[str, ...], int]] = {
    "ArtifactoryDetector": (("AKC", "AP"), 11),
    "AWSKeyDetector": (("A3T", "ABIA", "ACCA", "AKIA", "ASIA", "aws", "AWS", "Aws"), 20),
    "AzureStorageKeyDetector": (("AccountKey=",), 99),
    "BasicAuthDetector": (("://",), 7),
    "GitHubTokenDetector": (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), 40),
    "GitLabTokenDetector": (
        (
            *("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941", "glcbt-"),
            *("glimt-", "glptt-", "glagent-", "gloas-"),
        ),
        25,
    ),
    "JwtTokenDetector": (("eyJ",), 12),
    "MailchimpDetector": (("-us",), 36),
    "NpmDetector": ((":_authToken=",), 20),
    "OpenAIDetector": (("T3BlbkFJ",), 51),
    "PrivateKeyDetector": (("BEGIN ", "PuTTY-User-Key-File-"), 12),
    "PypiTokenDetector": (("pypi-AgE",), 70),
    "SendGridDetector": (("SG.",), 69),
    "SlackDetector": (("xox", "XOX", "Xox", "hooks.slack.com"), 12),
    "SquareOAuthDetector": (("sq0csp-",), 50),
    "StripeDetector": (("k_live_",), 32),
    "TelegramBotTokenDetector": ((":",), 44),
    "TwilioKeyDetector": (("AC", "SK"), 34),
}
# Rules with no literal in common: tried on every string of at least their length.
_UNANCHORED: dict[str, int] = {"DiscordBotTokenDetector": 59}

_NOT_AFTER_TOKEN = r"(?<![A-Za-z0-9_-])"
# The mesh's own rules: (group, anchors, minimum length, pattern).
_MESH_RULES: tuple[tuple[str, tuple[str, ...], int, str], ...] = (
    ("gh-long", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), 40, r"gh[pousr]_[A-Za-z0-9]{36,}"),
    ("gh-fine-grained", ("github_pat_",), 61, _NOT_AFTER_TOKEN + r"github_pat_\w{50,}"),
    ("stripe-test", ("k_test_",), 24, r"(?<![A-Za-z0-9])[sr]k_test_[A-Za-z0-9]{16,}"),
    ("google", ("AIza",), 39, r"AIza[0-9A-Za-z_-]{35}"),
    (
        "openai-anthropic",
        ("sk-",),
        35,
        _NOT_AFTER_TOKEN + r"sk-(?:proj-|ant-[a-z0-9]+-)?[\w-]{32,}",
    ),
    ("npm", ("npm_",), 40, _NOT_AFTER_TOKEN + r"npm_[A-Za-z0-9]{36}"),
    ("npm-authtoken", ("_authToken",), 30, r"_authToken\s*=\s*[\"']?[A-Za-z0-9+/=_.-]{20,}"),
    ("pypi", ("pypi-AgE",), 58, r"pypi-AgE[A-Za-z0-9_-]{50,}"),
    ("sendgrid", ("SG.",), 51, r"SG\.[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{32,64}"),
    ("pem", ("-----BEGIN ",), 23, r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY"),
    ("putty", ("PuTTY-User-Key-File-",), 23, r"PuTTY-User-Key-File-\d+: *[a-z0-9-]+"),
    ("url-password", ("://",), 8, r"://[^/\s:@]*:[^/\s@]{3,}@"),
    ("authorization", ("Bearer ", "Basic "), 26, r"(?:Bearer|Basic) +[A-Za-z0-9._~+/=-]{20,}"),
    ("slack-app", ("xapp-",), 20, r"xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]{16,}"),
    ("slack-config", ("xoxe",), 20, r"xoxe(?:\.xox[bp])?-\d-[A-Za-z0-9]{32,}"),
    (
        "aws-secret-line",
        ("aws", "AWS", "Aws"),
        40,
        r"(?i:aws)[\w.-]{0,20}?(?i:secret|key)[\w.-]{0,20}?[\"']?\s*[=:]\s*[\"']?"
        r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    ),
    ("huggingface", ("hf_", "api_org_"), 37, _NOT_AFTER_TOKEN + r"(?:hf_|api_org_)[A-Za-z]{34}"),
    ("vault", ("hvs.", "hvb.", "hvr."), 28, _NOT_AFTER_TOKEN + r"hv[sbr]\.[A-Za-z0-9_-]{24,}"),
    ("databricks", ("dapi",), 36, r"(?<![A-Za-z0-9])dapi[a-f0-9]{32}(?:-\d)?(?![A-Za-z0-9])"),
    ("digitalocean", ("_v1_",), 70, r"do[opr]_v1_[a-f0-9]{64}"),
    (
        "shopify",
        ("shpat_", "shpca_", "shppa_", "shpss_"),
        38,
        r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}",
    ),
    (
        "doppler",
        ("dp.",),
        46,
        r"dp\.(?:pt|st|ct|sa|scim|audit)\.(?:[a-z0-9_-]{1,40}\.)?[A-Za-z0-9]{40,}",
    ),
    (
        "curl-user",
        ("curl",),
        14,
        r"\bcurl\b.*?\s(?:-u\s*|--user[\s=]+)[\"']?[^\s:\"'$]+:(?!\$)[^\s\"']{3,}",
    ),
    ("azure-sas", ("sig=",), 40, r"[?&]sig=[A-Za-z0-9%]{40,}"),
    ("telegram-bot-url", ("/bot",), 50, r"/bot\d{8,10}:[A-Za-z0-9_-]{35}"),
)

_Rule = tuple[re.Pattern[str], Callable[[str], bool] | None]


def _jwt_header_is_json(token: str) -> bool:
    """detect-secrets' own check: a JWT's header decodes to a JSON object."""
    import base64  # only once a JWT-shaped string turns up
    import binascii

    head = token.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        return False
    return raw.lstrip().startswith(b"{") and raw.rstrip().endswith(b"}")


def _url_password_is_real(found: str) -> bool:
    """`://user:<password>@`, `://app:${DB_PASSWORD}@`: a URL template, not a password."""
    return not is_placeholder(found[found.rindex(":") + 1 : -1])


_CONFIRM: dict[str, Callable[[str], bool]] = {
    "JwtTokenDetector": _jwt_header_is_json,
    "BasicAuthDetector": _url_password_is_real,
    "url-password": _url_password_is_real,
}


def _groups() -> tuple[dict[str, list[tuple[str, int]]], dict[str, tuple[tuple[str, ...], int]]]:
    patterns: dict[str, list[tuple[str, int]]] = {}
    anchors: dict[str, tuple[tuple[str, ...], int]] = {}
    for name, pattern, flags in DETECT_SECRETS_RULES:
        patterns.setdefault(name, []).append((pattern, flags))
        if name in _DETECT_SECRETS_ANCHORS:
            anchors[name] = _DETECT_SECRETS_ANCHORS[name]
    for name, found_by, min_len, pattern in _MESH_RULES:
        patterns.setdefault(name, []).append((pattern, 0))
        anchors[name] = (found_by, min_len)
    return patterns, anchors


_PATTERNS, _GROUP_ANCHORS = _groups()
_GROUPS_FOR: dict[str, list[tuple[str, int]]] = {}
for _name, (_anchors, _min_len) in _GROUP_ANCHORS.items():
    for _anchor in _anchors:
        _GROUPS_FOR.setdefault(_anchor, []).append((_name, _min_len))
# An anchor found also stands for every anchor inside it (`:_authToken=` holds `:` and
# `_authToken`): the scan reports the longest anchor at each position.
_GROUPS_FOR = {
    anchor: [group for inner in _GROUPS_FOR if inner in anchor for group in _GROUPS_FOR[inner]]
    for anchor in _GROUPS_FOR
}


def _anchor_pattern(words: list[str]) -> str:
    """One alternation per first character, longest anchor first inside: re then tries one
    branch per position instead of one per anchor, which keeps the no-anchor scan (nearly
    every string) as fast with seventy anchors as it was with thirty, and compiles in under
    a millisecond."""
    by_first: dict[str, list[str]] = {}
    for word in sorted(words, key=len, reverse=True):
        by_first.setdefault(word[0], []).append(re.escape(word[1:]))
    return "|".join(
        re.escape(first) + "(?:" + "|".join(rests) + ")" for first, rests in by_first.items()
    )


_ANCHOR_RE = re.compile(_anchor_pattern(list(_GROUPS_FOR)))
_MIN_SCANNED_LEN = 11  # shorter strings cannot hold any of the shapes


@cache
def _compiled(name: str) -> tuple[_Rule, ...]:
    """A group's patterns, compiled the first time one of its anchors shows up (compiling
    them all up front would cost every process a few milliseconds)."""
    confirm = _CONFIRM.get(name)
    return tuple((re.compile(p, flags), confirm) for p, flags in _PATTERNS[name])


def _is_filler(found: str) -> bool:
    """`AKIAXXXXXXXXXXXXXXXX`, `sk_live_000…`: a shape whose end is filled with `x`, `X`,
    `0` or `*` is a placeholder in documentation, not a credential."""
    return not found[-12:].strip("xX0*")


def _group_hits(name: str, value: str) -> bool:
    for pattern, confirm in _compiled(name):
        for match in pattern.finditer(value):
            found = match.group()
            if _is_filler(found):
                continue
            if confirm is None or confirm(found):
                return True
    return False


def _normalise_key(key: str) -> str:
    return _SEP_RE.sub("_", _CAMEL_RE.sub(r"\1_\2", key).lower()).strip("_")


_SECRET_KEY_RE = re.compile(r"(?:^|_)(?:" + "|".join(_SECRET_KEY_ENDINGS) + r")$")


@lru_cache(maxsize=4096)  # payload keys repeat across events; values do not
def is_secret_key(key: str) -> bool:
    """`db_password`, `githubToken`, `API-Key`, `db_pass`: a key that names a secret."""
    return _SECRET_KEY_RE.search(_normalise_key(key)) is not None


def is_placeholder(value: str) -> bool:
    """`***`, `<redacted>`, `${TOKEN}`, empty: stands in for a secret without holding one."""
    stripped = value.strip()
    return not stripped or _PLACEHOLDER_RE.match(stripped) is not None


def looks_like_credential(value: str) -> bool:
    """True when `value` contains a known credential shape (cloud keys, tokens, PEM, JWT,
    URL passwords, Authorization values, ...)."""
    size = len(value)
    if size < _MIN_SCANNED_LEN:
        return False
    found = _ANCHOR_RE.search(value)
    tried: set[str] = set()
    while found is not None:
        for name, min_len in _GROUPS_FOR[found.group()]:
            if size >= min_len and name not in tried:
                tried.add(name)
                if _group_hits(name, value):
                    return True
        # from the next character on: anchors may overlap (`A3T3BlbkFJ`)
        found = _ANCHOR_RE.search(value, found.start() + 1)
    for name, min_len in _UNANCHORED.items():
        if size >= min_len and _group_hits(name, value):
            return True
    return False


def rule_groups() -> dict[str, tuple[tuple[str, ...], int]]:
    """Every rule group with its anchors and minimum length (for tests and docs)."""
    return {**_GROUP_ANCHORS, **{name: ((), n) for name, n in _UNANCHORED.items()}}
