"""The node's config, `state/event_mesh/config.toml`: handler modules, dispatch policy,
the scaling decision table and the lanes. Validated with pydantic so that a broken config
is one clear error naming the key, not a surprise in the middle of a dispatch."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import BadInput

_PUBLIC_KEY_RE = re.compile(r"ed25519:[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")  # 32 bytes
_CONDITION_RE = re.compile(r"^\s*(==|!=|>=|<=|>|<)\s*(-?\d+)\s*$")
COUNT_FIELDS = (
    "failed_count",
    "parallel_groups_at_limit",
    "started_count",
    "restarted_count",
    "scaled_up_count",
    "scaled_down_count",
)


# Headers the forwarder sets itself; a consumer's config may not override them.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "idempotency-key",
        "x-orxaq-event-id",
        "x-orxaq-routing-key",
        "x-orxaq-node",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DispatchPolicy(_Strict):
    max_attempts: int = Field(3, ge=1, le=100)
    backoff_seconds: float = Field(1.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_open_seconds: float = Field(60.0, ge=0)
    backoff_jitter: float = Field(0.5, ge=0, le=1)  # a retry waits (1 - jitter * rand) * backoff
    batch: int = Field(5000, ge=1, le=100_000)  # events handled per durable commit


class Rule(_Strict):
    """First-match rule: every condition (`field = ">0"`) must hold."""

    when: dict[str, str] = Field(default_factory=dict)
    action: Literal["scale_up", "scale_down", "hold"]
    reason: str
    target_delta: int

    @field_validator("when")
    @classmethod
    def _conditions(cls, value: dict[str, str]) -> dict[str, str]:
        for name, condition in value.items():
            if name not in COUNT_FIELDS:
                raise ValueError(f"unknown count {name!r}; known: {', '.join(COUNT_FIELDS)}")
            if not _CONDITION_RE.match(condition):
                raise ValueError(f"condition {condition!r} for {name}: need e.g. '>0' or '==0'")
        return value

    def matches(self, counts: dict[str, int]) -> bool:
        for name, condition in self.when.items():
            found = _CONDITION_RE.match(condition)
            assert found is not None  # checked at load
            op, limit = found.group(1), int(found.group(2))
            value = counts.get(name, 0)
            ok = {
                "==": value == limit,
                "!=": value != limit,
                ">=": value >= limit,
                "<=": value <= limit,
                ">": value > limit,
                "<": value < limit,
            }[op]
            if not ok:
                return False
        return True


SCALING_V1 = (
    Rule(
        when={"failed_count": ">0"}, action="scale_down", reason="failures_present", target_delta=-1
    ),
    Rule(
        when={"parallel_groups_at_limit": ">0", "started_count": "==0", "restarted_count": "==0"},
        action="scale_up",
        reason="capacity_saturated",
        target_delta=1,
    ),
    Rule(
        when={"scaled_down_count": ">0"}, action="hold", reason="recent_scale_down", target_delta=0
    ),
    Rule(when={"scaled_up_count": ">0"}, action="hold", reason="recent_scale_up", target_delta=0),
)
FALLBACK = Rule(action="hold", reason="stable", target_delta=0)


class Scaling(_Strict):
    table_version: str = "scaling_v1"
    rules: tuple[Rule, ...] = SCALING_V1

    def decide(self, counts: dict[str, int]) -> Rule:
        return next((rule for rule in self.rules if rule.matches(counts)), FALLBACK)


class Lane(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    rank: int = 0
    enabled: bool = True
    capabilities: tuple[str, ...] = ()
    start: str | list[str] | None = None  # optional for a lane that only runs tasks
    stop: str | list[str] | None = None
    run: str | list[str] | None = None  # the command that runs a task (dispatch/tasks.py)
    max_parallel: int = Field(1, ge=1, le=10_000)  # tasks at once; more wait in order
    timeout: float = Field(60.0, gt=0)

    @field_validator("start", "stop", "run")
    @classmethod
    def _command(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and not (value.strip() if isinstance(value, str) else value):
            raise ValueError("an empty command; leave the key out instead")
        return value

    @model_validator(mode="after")
    def _something_to_run(self) -> Lane:
        if self.run is None and (self.start is None or self.stop is None):
            raise ValueError(f"lane {self.id!r} needs start and stop commands, or run, or both")
        return self


class Consumer(_Strict):
    """A webhook that matching events are posted to (see forward.py)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    url: str = Field(pattern=r"^https?://[^\s/?#]+[^\s]*$")
    match: str = "#"
    critical: bool = True
    timeout: float = Field(5.0, gt=0, le=300)
    attempts: int | None = Field(None, ge=1, le=100)  # default: [dispatch] max_attempts
    headers: dict[str, str] = Field(default_factory=dict)
    headers_env: dict[str, str] = Field(default_factory=dict)  # header -> variable name

    @field_validator("match")
    @classmethod
    def _pattern(cls, value: str) -> str:
        from .patterns import Pattern

        try:
            Pattern(value)
        except BadInput as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises for a port out of range
        except ValueError as exc:
            raise ValueError(f"bad url {value!r}: {exc}") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the url are refused; send them with headers_env")
        return value

    @field_validator("headers", "headers_env")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name) or re.search(
                r"[\x00-\x1f\x7f]", item
            ):
                raise ValueError(f"bad header {name!r}")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the forwarder")
        return value


class Trust(_Strict):
    """Keys whose signature makes the ledger's trust.json count (see trust.py)."""

    policy_keys: tuple[str, ...] = ()

    @field_validator("policy_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            if not _PUBLIC_KEY_RE.fullmatch(key):
                raise ValueError(f"bad public key {key!r}: need ed25519:<base64url of 32 bytes>")
        return value


class Nats(_Strict):
    """`[nats]`: the real-time exchange over NATS JetStream (exchange/). Off without a url.
    Credentials are named, never inline: a NATS .creds file, a token file, or the name of
    an environment variable that holds the token."""

    url: str | None = None  # one server, or several separated by commas (a cluster)
    stream: str = Field("ORXAQ_MESH", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    subject_prefix: str = Field("orxaq.mesh", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    credentials_file: str | None = None  # a NATS .creds file (JWT + nkey seed)
    token_file: str | None = None
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @field_validator("url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        for one in (value or "").split(","):
            if "@" in one:
                raise ValueError("credentials in the url are refused; use credentials_file")
            if not re.fullmatch(r"(nats|tls|ws|wss)://[^\s/?#@]+", one.strip()):
                raise ValueError(f"bad url {one!r}: need nats://host:port")
        return value

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def servers(self) -> list[str]:
        return [one.strip() for one in (self.url or "").split(",")]


class Schemas(_Strict):
    """`[schemas]`: with `required`, a subject without a schema may not be published."""

    required: bool = False


class NamingRule(_Strict):
    """`[[naming]]`: a tenant's events must have subjects (routing keys) matching `pattern`."""

    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"bad regular expression {value!r}: {exc}") from None
        return value


class Config(_Strict):
    handlers: tuple[str, ...] = ()
    schemas: Schemas = Schemas()
    naming: tuple[NamingRule, ...] = ()
    nats: Nats = Nats()
    trust: Trust = Trust()
    dispatch: DispatchPolicy = DispatchPolicy()
    scaling: Scaling = Scaling()
    lanes: tuple[Lane, ...] = ()
    forward: tuple[Consumer, ...] = ()

    @field_validator("forward")
    @classmethod
    def _unique_consumers(cls, value: tuple[Consumer, ...]) -> tuple[Consumer, ...]:
        _refuse_twice([consumer.name for consumer in value], "forward consumer")
        return value

    @field_validator("lanes")
    @classmethod
    def _unique_lanes(cls, value: tuple[Lane, ...]) -> tuple[Lane, ...]:
        _refuse_twice([lane.id for lane in value], "lane id")
        return value

    def lane(self, lane_id: str) -> Lane | None:
        return next((lane for lane in self.lanes if lane.id == lane_id), None)


def _refuse_twice(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} {dupes[0]!r} is declared twice")


def load_config(path: Path) -> Config:
    """The config at `path`, or the defaults when there is none."""
    if not path.exists():
        return Config()
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
        return Config.model_validate(data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise BadInput(f"broken config {path}: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise BadInput(f"broken config {path}: {where}: {first['msg']}") from None


TEMPLATE = """\
# orxaq event mesh: this node's config. Every key is optional; the defaults are shown.

# Python modules with extra handlers (dotted names on sys.path, or .py files relative to
# the root). Functions decorated with @orxaq_autonomy.handlers.handler are registered.
# handlers = ["my_team.mesh_handlers", "mesh/handlers.py"]

[trust]
# The ledger's trust.json (whose keys each node is) counts only when signed by one of
# these keys (mesh-sign-policy makes the signature); unsigned, it is reported and ignored.
# policy_keys = ["ed25519:..."]

[dispatch]
# max_attempts = 3            # a failing handler is dead-lettered after this many tries
# backoff_seconds = 1.0       # wait before the first retry; doubles on each retry
# backoff_max_seconds = 300.0
# breaker_failures = 5        # consecutive failures that pause a handler
# breaker_open_seconds = 60.0 # how long it pauses; its events wait without using attempts
# backoff_jitter = 0.5        # a retry waits between (1 - jitter) and 1 times its backoff
# batch = 5000                # events handled per durable commit

[scaling]
# table_version = "scaling_v1"
# First matching rule wins; none matching means hold / stable / 0. Replacing the rules
# replaces the whole table (scaling_v1 is below).
# [[scaling.rules]]
# when = { failed_count = ">0" }
# action = "scale_down"
# reason = "failures_present"
# target_delta = -1
# [[scaling.rules]]
# when = { parallel_groups_at_limit = ">0", started_count = "==0", restarted_count = "==0" }
# action = "scale_up"
# reason = "capacity_saturated"
# target_delta = 1
# [[scaling.rules]]
# when = { scaled_down_count = ">0" }
# action = "hold"
# reason = "recent_scale_down"
# target_delta = 0
# [[scaling.rules]]
# when = { scaled_up_count = ">0" }
# action = "hold"
# reason = "recent_scale_up"
# target_delta = 0

# Lanes this node offers. start/stop run with a timeout (seconds), as a shell command
# string or an argv list, with ORXAQ_LANE_ID, ORXAQ_LANE_ACTION, ORXAQ_COMMAND_ID,
# ORXAQ_EVENT_ID, ORXAQ_NODE_ID, ORXAQ_TARGET_DELTA and ORXAQ_REASON in the environment.
# [[lanes]]
# id = "lane-1"
# rank = 1
# enabled = true
# capabilities = ["python"]
# start = "systemctl --user start agent@1"
# stop = ["systemctl", "--user", "stop", "agent@1"]
# timeout = 60
# A lane that runs tasks routed here (docs/tasks.md) has `run` (start/stop are then optional);
# the command runs detached in its own group with this timeout, ORXAQ_TASK_ID,
# ORXAQ_EVENT_ID, ORXAQ_NODE_ID, ORXAQ_LANE_ID and the task's payload in the JSON file
# named by ORXAQ_TASK_PAYLOAD_FILE.
# run = ["agent", "run-task"]
# max_parallel = 1            # tasks at once on this lane; further tasks wait in order

# Real-time exchange over NATS JetStream (mesh-listen, and mesh-serve): events reach the
# other nodes within milliseconds; git still converges everything. Off without a url.
# Credentials are named, never written here: a .creds file, a token file or a variable.
# [nats]
# url = "nats://127.0.0.1:4222"
# stream = "ORXAQ_MESH"
# subject_prefix = "orxaq.mesh"
# credentials_file = "/etc/orxaq/node-a.creds"
# token_file = "/etc/orxaq/nats.token"
# token_env = "ORXAQ_NATS_TOKEN"

# Webhooks: matching events are posted to each URL (JSON envelope, with the event id in
# X-Orxaq-Event-Id and Idempotency-Key so receivers can drop repeats). Deliveries are retried
# with backoff; spent attempts go to the dead letters (mesh-dlq). A critical consumer gets
# events of one partition_key in order; a best-effort one (critical = false) does not wait.
# [[forward]]
# name = "ci-dashboard"
# url = "https://dash.example.com/hooks/mesh"
# match = "ci.#"
# critical = true
# timeout = 5
# attempts = 5
# headers = { X-Team = "infra" }
# headers_env = { Authorization = "DASH_HOOK_AUTH" }  # value read from $DASH_HOOK_AUTH
"""
