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


# A corpus of realistic (fake) credentials, built from their published shapes, and of
# harmless look-alikes. Every secret is refused; every look-alike passes.
A36 = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
CORPUS_SECRETS = [
    "AKIAIOSFODNN7EXAMPLE",
    "ASIAY34FZKBOKMUTVV7A",
    "aws key AKIA2E0A8F3B244C9986 in a sentence",
    "ghp_" + A36,
    "gho_" + A36,
    "ghu_" + A36,
    "ghs_" + A36,
    "ghr_" + A36,
    "github_pat_11ABCDEFG0" + "aB3dE5fG7h" * 7,
    "glpat-xY3zA5bC7dE9fG1hJ3kL",
    "xoxb-123456789012-1234567890123-aB3dE5fG7hJ9kL1mN3pQ5rS7",
    "xoxp-123456789012-123456789012-123456789012-abcdef0123456789abcdef0123456789",
    "xoxa-2-aB3dE5fG7hJ9kL1mN3pQ",
    "https://hooks.slack.com/services/T0ABCDEFG/B0ABCDEFG/aB3dE5fG7hJ9kL1mN3pQ5rS7",
    "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "sk_test_" + "51H8aB3dE5fG7hJ9kL1mN3pQ",
    "rk_live_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7",
    "AIzaSyA-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1x",
    "sk-proj-" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9",
    "sk-ant-api03-" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1h",
    "npm_" + A36,
    "pypi-AgEIcHlwaS5vcmc" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1hJ3k",
    "SG.aB3dE5fG7hJ9kL1mN3pQ5r.aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA...",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
    "-----BEGIN EC PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fw",
    "postgres://admin:s3cretpw@db.internal:5432/app",
    "https://deploy:hunter22@git.example.com/org/repo.git",
    "redis://:longpassword@cache:6379/0",
    "Bearer aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1",
    "Basic YWxhZGRpbjpvcGVuc2VzYW1lMTIzNDU2",
]
CORPUS_HARMLESS = [
    "9f86d081884c7d659a2feaf0c55958159d4d1c9fb1cb7a1a3b4a4a6c5e2a1e3f",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "123e4567-e89b-12d3-a456-426614174000",
    "550e8400-e29b-41d4-a716-446655440000",
    "evt_" + "ab" * 32,
    "3f9a2c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZGF0YQ==",
    "U29tZSBiYXNlNjQgZW5jb2RlZCBwYXlsb2FkIHRoYXQgaXMgZmluZQ==",
    "https://example.com/path?q=1&page=2",
    "git@github.com:org/repo.git",
    "ssh://git@github.com/org/repo.git",
    "mailto:ops@example.com",
    "task-00000017",
    "risk-assessment-of-the-whole-system-and-every-subsystem",
    "the ghp prefix alone is fine",
    "sk-short",
    "skeleton-key-ring-collection-2026-edition-volume-two",
    "AKIA is a prefix",
    "2026-11-22T12:34:56.789012Z",
    "node-a.eu-west-1.compute.internal",
    "lane-3 finished in 12.5 s",
    "ed25519:ClD6MxrGhtLNW3POz5g_Tv2oqsRVJ1C79CeA_cqXCcA",
    "sha256:9f86d081884c7d659a2feaf0c55958159d4d1c9fb1cb7a1a3b4a4a6c5e2a1e3f",
    "BEGIN PUBLIC KEY block is fine",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE",
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa",
    "https://user@example.com/only-a-user",
    "Bearer",
    "Basic auth is disabled",
    "xox is a palindrome-ish word",
    "cmd_65f0721524c7aeb1312e",
]


@pytest.mark.parametrize("value", CORPUS_SECRETS)
def test_corpus_secrets_are_refused(value: str) -> None:
    assert len(CORPUS_SECRETS) >= 30
    assert payload_problem({"note": value}) is not None


@pytest.mark.parametrize("value", CORPUS_HARMLESS)
def test_corpus_look_alikes_pass(value: str) -> None:
    assert len(CORPUS_HARMLESS) >= 30
    assert payload_problem({"note": value}) is None
