"""Secret refusal: credentials never reach a ledger that people review in public."""

from __future__ import annotations

import base64
import importlib.util
import random
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orxaq_autonomy import secretscan
from orxaq_autonomy.envelope import payload_problem
from orxaq_autonomy.secretrules import RULES as DETECT_SECRETS_RULES
from orxaq_autonomy.secretscan import looks_like_credential, rule_groups

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


# --- a broad corpus: the kinds that leak in practice, each in the setting it leaks in ------

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0234567"
_HEX = "0123456789abcdef"
_LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_B64 = _ALNUM + "+/"
_URLSAFE = _ALNUM + "_-"


def _r(n: int, alphabet: str = _ALNUM, seed: int = 0) -> str:
    """A fixed pseudo-random body: realistic variety, the same on every run."""
    rng = random.Random(f"{seed}-{n}-{alphabet}")
    return "".join(rng.choice(alphabet) for _ in range(n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(header: bytes, claims: bytes, signature: str) -> str:
    return f"{_b64url(header)}.{_b64url(claims)}.{signature}"


BROAD_SECRETS: list[tuple[str, str]] = [
    # AWS access key ids of every prefix, and secret-key lines as config files hold them
    ("aws-akia", "AKIA" + _r(16, _UPPER, 1)),
    ("aws-asia", "ASIA" + _r(16, _UPPER, 2)),
    ("aws-a3t", "A3TX" + _r(16, _UPPER, 3)),
    ("aws-a3t-2", "key id A3TB" + _r(16, _UPPER, 4) + " in the log"),
    ("aws-abia", "ABIA" + _r(16, _UPPER, 5)),
    ("aws-acca", "ACCA" + _r(16, _UPPER, 6)),
    ("aws-secret-ini", "aws_secret_access_key = " + _r(40, _B64, 7)),
    ("aws-secret-env", "AWS_SECRET_ACCESS_KEY=" + _r(40, _B64, 8)),
    ("aws-secret-quoted", 'aws_secret_key: "' + _r(40, _B64, 9) + '"'),
    ("aws-secret-yaml", "AwsSecretKey: " + _r(40, _B64, 10)),
    # GitHub
    ("github-pat", "ghp_" + _r(36, seed=11)),
    ("github-oauth", "gho_" + _r(36, seed=12)),
    ("github-app", "ghs_" + _r(36, seed=13)),
    ("github-fine", "github_pat_11" + _r(20, _UPPER, 14) + "_" + _r(59, seed=14)),
    # GitLab: personal, deploy, runner, OAuth, feed, CI job, trigger, agent, registration
    ("gitlab-pat", "glpat-" + _r(20, _URLSAFE, 15)),
    ("gitlab-deploy", "gldt-" + _r(20, _URLSAFE, 16)),
    ("gitlab-runner", "glrt-" + _r(20, _URLSAFE, 17)),
    ("gitlab-runner-reg", "GR1348941" + _r(20, _URLSAFE, 18)),
    ("gitlab-oauth", "gloas-" + _r(64, _HEX, 19)),
    ("gitlab-feed", "glft-" + _r(20, _URLSAFE, 20)),
    ("gitlab-cijob", "glcbt-" + _r(20, _URLSAFE, 21)),
    ("gitlab-trigger", "glptt-" + _r(40, _HEX, 22)),
    ("gitlab-agent", "glagent-" + _r(50, _URLSAFE, 23)),
    # Slack: bot, user, app-level, config, webhooks
    ("slack-bot", "xoxb-1234567890123-1234567890123-" + _r(24, seed=24)),
    ("slack-user", "xoxp-1234567890-1234567890-1234567890123-" + _r(32, _HEX, 25)),
    ("slack-app", "xapp-1-A0" + _r(9, _UPPER, 26) + "-4567890123456-" + _r(64, _HEX, 26)),
    ("slack-app-2", "SLACK_APP_TOKEN=xapp-1-A1" + _r(9, _UPPER, 27) + "-12345-" + _r(40, _HEX)),
    ("slack-config", "xoxe.xoxp-1-" + _r(140, seed=28)),
    (
        "slack-webhook",
        "https://hooks.slack.com/services/T"
        + _r(8, _UPPER, 29)
        + "/B"
        + _r(8, _UPPER, 30)
        + "/"
        + _r(24, seed=31),
    ),
    # Stripe: live and test secrets, restricted keys
    ("stripe-live", "sk_live_" + _r(24, seed=32)),
    ("stripe-test", "sk_test_" + _r(24, seed=33)),
    ("stripe-restricted", "rk_live_" + _r(24, seed=34)),
    ("stripe-restricted-test", "rk_test_" + _r(99, seed=35)),
    # JWTs: signed, unsigned (alg none), as a header value
    (
        "jwt-hs256",
        _jwt(b'{"alg":"HS256","typ":"JWT"}', b'{"sub":"42","admin":true}', _r(43, _URLSAFE, 36)),
    ),
    ("jwt-unsigned", _jwt(b'{"alg":"none"}', b'{"sub":"1234567890","role":"admin"}', "")),
    ("jwt-unsigned-typ", _jwt(b'{"typ":"JWT","alg":"none"}', b'{"iss":"ci"}', "")),
    (
        "jwt-bearer",
        "Authorization: Bearer " + _jwt(b'{"alg":"RS256"}', b'{"sub":"x"}', _r(86, _URLSAFE)),
    ),
    # npm
    ("npm-token", "npm_" + _r(36, seed=37)),
    ("npmrc-authtoken", "//registry.npmjs.org/:_authToken=" + _r(36, _HEX + "-", 38)),
    ("npmrc-authtoken-npm", "//registry.npmjs.org/:_authToken=npm_" + _r(36, seed=39)),
    ("npmrc-authtoken-gh", "//npm.pkg.github.com/:_authToken=" + _r(40, _B64, 40)),
    ("npmrc-authtoken-bare", "_authToken=" + _r(64, _B64, 41)),
    # private keys of every wrapping
    ("pem-rsa", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA" + _r(60, _B64, 42)),
    ("pem-openssh", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU"),
    ("pem-encrypted", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w"),
    ("pem-pgp", "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF" + _r(40, _B64, 43)),
    ("putty-v2", "PuTTY-User-Key-File-2: ssh-rsa\nEncryption: none\nComment: rsa-key"),
    ("putty-v3", "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: ed"),
    # Twilio, Discord, Telegram, Mailchimp, SendGrid
    ("twilio-sid", "AC" + _r(32, _HEX, 44)),
    ("twilio-key", "SK" + _r(32, _HEX, 45)),
    (
        "discord-bot",
        "MTA" + _r(21, _URLSAFE, 46) + "." + _r(6, _URLSAFE, 47) + "." + _r(27, _URLSAFE, 48),
    ),
    (
        "discord-bot-2",
        "ODk" + _r(22, _URLSAFE, 49) + "." + _r(6, _URLSAFE, 50) + "." + _r(38, _URLSAFE, 51),
    ),
    ("telegram-bot", "123456789:AA" + _r(33, _URLSAFE, 52)),
    ("telegram-url", "https://api.telegram.org/bot5432109876:AA" + _r(33, _URLSAFE, 53) + "/getMe"),
    ("mailchimp", _r(32, _HEX, 54) + "-us14"),
    ("mailchimp-2", "MAILCHIMP_KEY=" + _r(32, _HEX, 55) + "-us6"),
    ("sendgrid", "SG." + _r(22, _URLSAFE, 56) + "." + _r(43, _URLSAFE, 57)),
    # Azure storage: account keys and SAS signatures
    (
        "azure-conn",
        "DefaultEndpointsProtocol=https;AccountName=prodstore;AccountKey="
        + _r(86, _B64, 58)
        + "==;EndpointSuffix=core.windows.net",
    ),
    ("azure-conn-2", "AccountKey=" + _r(86, _B64, 59) + "=="),
    (
        "azure-sas",
        "https://prodstore.blob.core.windows.net/c/b?sv=2022-11-02&se=2026-12-31&sig="
        + _r(43, _ALNUM, 60)
        + "%3D",
    ),
    # AI platforms
    ("huggingface", "hf_" + _r(34, _ALNUM[:52], 61)),
    ("huggingface-org", "api_org_" + _r(34, _ALNUM[:52], 62)),
    ("openai-proj", "sk-proj-" + _r(48, _URLSAFE, 63)),
    ("openai-legacy", "sk-" + _r(20, seed=64) + "T3BlbkFJ" + _r(20, seed=65)),
    ("anthropic", "sk-ant-api03-" + _r(93, _URLSAFE, 66)),
    ("google-api", "AIza" + _r(35, _URLSAFE, 67)),
    # Vault, Databricks, DigitalOcean, Shopify, Doppler, PyPI, Square, Artifactory
    ("vault-service", "hvs." + _r(24, seed=68)),
    ("vault-service-long", "VAULT_TOKEN=hvs.CAESI" + _r(90, _URLSAFE, 69)),
    ("vault-batch", "hvb." + _r(100, _URLSAFE, 70)),
    ("databricks", "dapi" + _r(32, _HEX, 71)),
    ("databricks-2", "DATABRICKS_TOKEN=dapi" + _r(32, _HEX, 72) + "-2"),
    ("digitalocean-pat", "dop_v1_" + _r(64, _HEX, 73)),
    ("digitalocean-oauth", "doo_v1_" + _r(64, _HEX, 74)),
    ("digitalocean-refresh", "dor_v1_" + _r(64, _HEX, 75)),
    ("shopify-access", "shpat_" + _r(32, _HEX, 76)),
    ("shopify-custom", "shpca_" + _r(32, _HEX, 77)),
    ("shopify-private", "shppa_" + _r(32, _HEX, 78)),
    ("shopify-secret", "shpss_" + _r(32, _HEX, 79)),
    ("doppler-personal", "dp.pt." + _r(43, seed=80)),
    ("doppler-service", "dp.st.prd." + _r(43, seed=81)),
    ("doppler-service-2", "dp.st." + _r(43, seed=82)),
    ("pypi", "pypi-AgEIcHlwaS5vcmc" + _r(80, _URLSAFE, 83)),
    ("square-oauth", "sq0csp-" + _r(43, _URLSAFE, 84)),
    ("artifactory", "AKCp8" + _r(68, seed=85)),
    # passwords in commands and URLs
    ("curl-u", "curl -u admin:" + _r(14, seed=86) + " https://ci.example.com/api"),
    ("curl-user", "curl --user deploy:" + _r(12, seed=87) + " -X POST https://x.example.com"),
    ("curl-u-quoted", "curl -s -u 'bot:" + _r(16, seed=88) + "' https://api.example.com/v1"),
    ("url-postgres", "postgresql://app:" + _r(16, seed=89) + "@db.internal:5432/app"),
    ("url-amqp", "amqp://guest:" + _r(12, seed=90) + "@mq.internal:5672/"),
    ("url-redis", "redis://:" + _r(20, seed=91) + "@cache:6379/0"),
    ("basic-header", "Authorization: Basic " + base64.b64encode(b"ci:" + _r(16).encode()).decode()),
]

# Secrets held under a key that names them (the value alone has no telling shape).
BROAD_SECRET_KEYS: list[dict[str, object]] = [
    {"db_pass": _r(14, seed=92)},
    {"DB_PASS": "Tr0ub4dor&3"},
    {"mysql_pw": "hunter2hunter2"},
    {"smtpPassword": "letmein-2026"},
    {"config": {"redis": {"auth_key": _r(24, seed=93)}}},
    {"env": [{"AWS_SECRET_ACCESS_KEY": _r(40, _B64, 94)}]},
]

BROAD_LOOK_ALIKES: list[str] = [
    "9f86d081884c7d659a2feaf0c55958159d4d1c9fb1cb7a1a3b4a4a6c5e2a1e3f",  # sha256
    "d41d8cd98f00b204e9800998ecf8427e",  # md5
    "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12",  # sha1
    "sha512-" + base64.b64encode(bytes(range(64))).decode(),  # npm integrity
    "123e4567-e89b-12d3-a456-426614174000",
    "019374b2-7c1e-7b4a-9a3b-3f2e1d0c9b8a",  # uuid v7
    "evt_" + _r(64, _HEX, 95),
    _r(64, _HEX, 96),  # a mesh event id
    "ed25519:" + _b64url(bytes(range(32))),  # a mesh public key
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI" + _r(43, _B64, 97) + " ops@example.com",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ" + _r(60, _B64, 98) + " ci@runner",
    "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA" + _r(43, _B64, 99),
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU",
    base64.b64encode(b"the quarterly report is attached, nothing secret here").decode(),
    base64.b64encode(bytes(range(48))).decode(),
    "AKIAXXXXXXXXXXXXXXXX",  # documentation placeholder
    "sk_live_" + "x" * 24,
    "ghp_" + "0" * 36,
    "xoxb-your-bot-token-here",
    "aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}",
    "AWS_SECRET_ACCESS_KEY=<your secret key>",
    "//registry.npmjs.org/:_authToken=${NPM_TOKEN}",
    "curl -u $USER:$TOKEN https://api.example.com",
    "curl -u admin https://example.com/prompted-for-password",
    "postgres://app:${DB_PASSWORD}@db:5432/app",
    "https://user:<password>@example.com/",
    "https://example.com:8443/path?sig=short",
    "s3://bucket/path/to/object.tar.gz",
    "arn:aws:iam::123456789012:role/ci-deploy",
    "us-east-1:12345678-1234-1234-1234-123456789012",
    "2026-11-22T12:34:56.789012Z",
    "12:34:56 build 1234567890 finished",
    "sha256:" + _r(64, _HEX, 100),
    "ACCESS granted to the SKILLS team",
    "APPLICATION_NAME=orders",
    "docker.io/library/python:3.12-slim@sha256:" + _r(64, _HEX, 101),
    "v1.2.3-rc.4+build.567",
    "The AWS region is eu-west-1 and the key rotation is monthly",
    "hf_transfer is enabled for faster downloads",
    "dapi version 2 is deprecated",
    "shpat_ tokens are rotated by the platform team",
    "dp.pt. prefixes mark Doppler personal tokens",
    "hvs. tokens expire after 32 days",
    "BEGIN PUBLIC KEY",
    "eyJ is how base64 JSON starts",
    "eyJub3RlIjoiaGVsbG8ifQ",  # base64 JSON, not a token
    "M" + _r(30, _URLSAFE, 102) + " and then some prose",
    "max_tokens=4096 temperature=0.2",
    "https://github.com/org/repo/pull/17#issuecomment-1234567890",
    "mailto:ops@example.com?subject=us-east",
    "order 12345678: " + "shipped to the warehouse today ok",
]
BROAD_HARMLESS_KEYS: list[dict[str, object]] = [
    {"password_policy": {"min_length": 12}, "max_tokens": 4096, "token_count": 3},
    {"db_pass": "${DB_PASS}", "api_key": "***", "first_pass": None},
    {"bypass": "enabled", "compass": "north", "passes": 3, "pwd_hint": "ask ops"},
]


def test_broad_corpus_caught_and_look_alikes_pass() -> None:
    assert len(BROAD_SECRETS) + len(BROAD_SECRET_KEYS) >= 80
    assert len(BROAD_LOOK_ALIKES) + len(BROAD_HARMLESS_KEYS) >= 50
    missed = [name for name, value in BROAD_SECRETS if payload_problem({"note": value}) is None]
    missed += [str(p) for p in BROAD_SECRET_KEYS if payload_problem(p) is None]
    total = len(BROAD_SECRETS) + len(BROAD_SECRET_KEYS)
    rate = (total - len(missed)) / total
    false_positives = [v for v in BROAD_LOOK_ALIKES if payload_problem({"note": v}) is not None]
    false_positives += [str(p) for p in BROAD_HARMLESS_KEYS if payload_problem(p) is not None]
    print(
        f"\nsecret corpus: {total - len(missed)}/{total} caught ({rate:.1%}), "
        f"{len(false_positives)} false positives on "
        f"{len(BROAD_LOOK_ALIKES) + len(BROAD_HARMLESS_KEYS)} look-alikes; missed: {missed}"
    )
    assert rate >= 0.95, missed
    assert false_positives == []


@pytest.mark.parametrize("name,value", BROAD_SECRETS, ids=[n for n, _ in BROAD_SECRETS])
def test_broad_secret_in_envelope_strings(name: str, value: str) -> None:
    """The same check guards every string of an event: a key, a nested value, a source."""
    assert payload_problem({"outer": [{"inner": value}]}) is not None
    assert payload_problem({value: 1}) is not None
    assert looks_like_credential(value), name


def test_rules_come_from_installed_detect_secrets() -> None:
    """secretrules.py is detect-secrets' rule set as data: regenerate it when they differ
    (`python scripts/gen_secretrules.py`). Every rule has anchors or a length gate."""
    spec = importlib.util.spec_from_file_location(
        "gen_secretrules", Path(__file__).parent.parent / "scripts" / "gen_secretrules.py"
    )
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    namespace: dict[str, object] = {}
    exec(gen.render(), namespace)
    assert namespace["RULES"] == DETECT_SECRETS_RULES
    groups = rule_groups()
    for name, _, _ in DETECT_SECRETS_RULES:
        assert name in groups, f"{name} has no anchors: add it to secretscan.py"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "-_.:/ =", max_size=80))
def test_anchor_fast_path_agrees_with_every_rule(value: str) -> None:
    """The anchor scan never hides a match: a string is flagged exactly when some rule
    (anchored or not, filler aside) matches it."""
    groups = rule_groups()
    brute = any(
        secretscan._group_hits(name, value) and len(value) >= secretscan._MIN_SCANNED_LEN
        for name, (_, min_len) in groups.items()
        if len(value) >= min_len
    )
    assert looks_like_credential(value) == brute


@given(st.sampled_from([v for _, v in BROAD_SECRETS]), st.text(max_size=20), st.text(max_size=20))
@settings(max_examples=200, deadline=None)
def test_secret_found_inside_any_text(secret: str, before: str, after: str) -> None:
    assert looks_like_credential(before + " " + secret + " " + after)
