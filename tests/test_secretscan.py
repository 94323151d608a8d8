"""Secret refusal: credentials never reach a ledger that people review in public."""

from __future__ import annotations

import pytest

from orxaq_autonomy.envelope import payload_problem

SECRETS = [
    {"password": "correct horse battery staple"},
    {"db": {"dbPassword": "s3cr3t-value"}},
    {"github_token": "abc123"},
    {"Authorization": "Bearer abcdefghijklmnopqrstuvwxyz123456"},
    {"aws": "AKIAIOSFODNN7EXAMPLE"},
    {"note": "token ghp_" + "a1B2" * 9},
    {"pat": "github_pat_" + "11ABCDEFG0" * 6},
    {"gl": "glpat-" + "x1y2z3" * 4},
    {"slack": "xoxb-123456789012-abcdefghijkl"},
    {"stripe": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"},
    {"pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIE..."},
    {
        "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    },
    {"url": "postgres://admin:hunter22@db.internal:5432/app"},
    {"list": ["fine", {"client_secret": "abcd"}]},
]

HARMLESS = [
    {"sha": "9f86d081884c7d659a2feaf0c55958159d4d1c9fb1cb7a1a3b4a4a6c5e2a1e3f"},
    {"uuid": "123e4567-e89b-12d3-a456-426614174000"},
    {"event": "evt_" + "ab" * 32},
    {"commit": "3f9a2c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39"},
    {"max_tokens": 4096, "token_count": 7, "tokens": ["a", "b"]},
    {"password": "", "api_key": "***", "secret": "<redacted>", "token": "${TOKEN}"},
    {"url": "https://example.com/path?q=1", "ssh": "git@github.com:org/repo.git"},
    {"data": "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZGF0YQ=="},
    {"password_policy": {"min_length": 12}},
]


@pytest.mark.parametrize("payload", SECRETS)
def test_secrets_are_found(payload: dict[str, object]) -> None:
    assert payload_problem(payload) is not None


@pytest.mark.parametrize("payload", HARMLESS)
def test_look_alikes_pass(payload: dict[str, object]) -> None:
    assert payload_problem(payload) is None
