"""The schema registry (SPEC 9): JSON Schema (draft 2020-12) versions per subject in the
ledger, `schemas/<subject>/v<N>.json`, and the subject's mode in `subject.json`.

Files arrive through git, so every read opens without following symlinks and is bounded.
A subject with no folder in the ledger may have a built-in version 1 shipped with the
package (the built-in chain's subjects). Payloads are checked with jsonschema-rs, imported
only when a subject really has a schema, so a publish of a subject without one pays
nothing; it never changes the payload and never fetches a `$ref`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from ..envelope import RESERVED_TOPIC, Draft, Envelope, loads_json
from ..errors import BadInput
from .compat import MODES, incompatibilities  # small; the validator itself is imported lazily
from .fsutil import (
    FileLock,
    UnsafeFile,
    atomic_write_bytes,
    dump_json_pretty,
    plain_folder,
    read_regular,
    utf8_name,
)
from .paths import Layout

MAX_SCHEMA_BYTES = 256 * 1024
MAX_VERSION = 99_999
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
SUBJECT_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+")
VERSION_FILE_RE = re.compile(r"v([1-9][0-9]{0,4})\.json")
SCHEMA_REF_RE = re.compile(r"([a-z0-9_-]+(?:\.[a-z0-9_-]+)+)/v([1-9][0-9]{0,4})")
BUILTIN_DIR = Path(__file__).with_name("builtin_schemas")
CHANGE_EVENT = (RESERVED_TOPIC, "schema.added")  # the registry's own change events


def check_subject(subject: Any) -> str:
    """A subject is a routing key (`topic.event_type`) outside the reserved topic."""
    if not isinstance(subject, str) or not SUBJECT_RE.fullmatch(subject) or len(subject) > 200:
        shown = subject if isinstance(subject, str) else type(subject).__name__
        raise BadInput(
            f"bad subject {str(shown)[:80]!r}: need a routing key topic.event_type "
            "(dot-separated segments of [a-z0-9_-]+)"
        )
    if subject.split(".", 1)[0] == RESERVED_TOPIC:
        raise BadInput(f"bad subject {subject!r}: topic {RESERVED_TOPIC!r} is the mesh's own")
    return subject


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise BadInput(f"bad compatibility mode {mode!r}: need one of {', '.join(MODES)}")
    return str(mode)


def parse_ref(ref: Any) -> tuple[str, int]:
    """`(subject, version)` from an envelope's `schema` field (`<subject>/v<N>`)."""
    match = SCHEMA_REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    if match is None:
        raise BadInput(f"bad schema {str(ref)[:80]!r}: need <subject>/v<N>")
    return match.group(1), int(match.group(2))


def _refuse_remote_refs(node: Any, where: str = "") -> None:
    """Only references inside the schema itself (`#...`) are allowed: a `$ref` to a URL
    or a file would make validation depend on (or leak to) the network."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and not (
                isinstance(value, str) and value.startswith("#")
            ):
                raise BadInput(
                    f"schema {key} {str(value)[:80]!r} at {where or '/'} points outside the "
                    "schema; only local references (#...) are allowed, nothing is fetched"
                )
            _refuse_remote_refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_remote_refs(value, f"{where}/{i}")


def _no_fetch(uri: str) -> Any:
    raise ValueError(f"refusing to fetch {uri}: schemas may only reference themselves")


def compile_validator(schema: dict[str, Any]) -> Any:
    """A jsonschema-rs draft 2020-12 validator; BadInput naming what is wrong."""
    import jsonschema_rs  # lazy: only subjects that have a schema pay for the import

    try:
        jsonschema_rs.meta.validate(schema)
        return jsonschema_rs.Draft202012Validator(schema, retriever=_no_fetch)
    except jsonschema_rs.ValidationError as exc:
        where = "/" + "/".join(str(p) for p in exc.instance_path)
        first = str(exc.message).splitlines()[0] if exc.message else str(exc).splitlines()[0]
        raise BadInput(f"not a valid JSON Schema (draft 2020-12) at {where}: {first}") from None
    except (ValueError, jsonschema_rs.ReferencingError) as exc:
        raise BadInput(f"not a usable JSON Schema: {str(exc).splitlines()[0]}") from None


def parse_schema(raw: bytes) -> dict[str, Any]:
    """A schema document from bytes: JSON, an object, draft 2020-12 (or no `$schema`),
    local references only, valid against the meta-schema."""
    return parse_and_compile(raw)[0]


def parse_and_compile(raw: bytes) -> tuple[dict[str, Any], Any]:
    """`parse_schema`, and the compiled validator with it."""
    if len(raw) > MAX_SCHEMA_BYTES:
        raise BadInput(f"schema is {len(raw)} bytes; the limit is {MAX_SCHEMA_BYTES}")
    try:
        schema = loads_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise BadInput("schema must be a JSON object")
    declared = schema.get("$schema", DRAFT_2020_12)
    if not isinstance(declared, str) or declared.rstrip("#") != DRAFT_2020_12:
        raise BadInput(f"schema declares $schema {str(declared)[:80]!r}; need {DRAFT_2020_12}")
    _refuse_remote_refs(schema)
    return schema, compile_validator(schema)


def _path(parts: Iterable[Any]) -> str:
    text = "payload"
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            text += f".{part}"
        else:
            text += f"[{orjson.dumps(str(part)).decode()}]"
    return text


def first_error(validator: Any, payload: Any) -> str | None:
    """`payload.task_id: 42 is not of type 'string'`, or None when the payload is valid.
    Only reads the payload (jsonschema-rs never fills in defaults)."""
    if validator.is_valid(payload):
        return None
    error = next(iter(validator.iter_errors(payload)))
    message = str(error.message).replace('"', "'")
    if len(message) > 300:
        message = message[:300] + "..."
    return f"{_path(error.instance_path)}: {message}"


class Version(NamedTuple):
    subject: str
    version: int
    schema: dict[str, Any]
    raw: bytes
    builtin: bool

    @property
    def ref(self) -> str:
        return f"{self.subject}/v{self.version}"

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()


class Registry:
    """The ledger's schemas for one layout. Lookups are cached per subject and refreshed
    when the subject's folder changes, so a long-running gateway sees a new version."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._latest: dict[str, tuple[Any, tuple[str, Any] | None]] = {}
        self._validators: dict[str, Any] = {}

    @property
    def root(self) -> Path:
        return self.layout.ledger_dir / "schemas"

    # --- reading -----------------------------------------------------------------------

    def _folder(self, subject: str) -> Path | None:
        try:
            return plain_folder(self.layout.ledger_dir, ("schemas", subject))
        except FileNotFoundError:
            return None

    def subjects(self) -> list[str]:
        """Every subject with a schema: the ledger's and the built-in ones."""
        found = {p.stem for p in BUILTIN_DIR.glob("*.json")}
        for name in self._listdir(None):
            if utf8_name(name) and SUBJECT_RE.fullmatch(name):
                found.add(name)
        return sorted(found)

    def _listdir(self, subject: str | None) -> list[str]:
        try:
            folder = plain_folder(
                self.layout.ledger_dir, ("schemas",) + ((subject,) if subject else ())
            )
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []

    def versions(self, subject: str) -> list[int]:
        """The subject's version numbers, ascending (a built-in subject not in the ledger: [1])."""
        folder = self._folder(subject)
        if folder is None:
            return [1] if (BUILTIN_DIR / f"{subject}.json").is_file() else []
        return sorted(
            int(m.group(1))
            for name in os.listdir(folder)
            if (m := VERSION_FILE_RE.fullmatch(name)) is not None
        )

    def get(self, subject: str, version: int) -> Version:
        """One version, parsed and checked; FileNotFoundError when it is not there."""
        folder = self._folder(subject)
        if folder is None:
            builtin = BUILTIN_DIR / f"{subject}.json"
            if version != 1 or not builtin.is_file():
                raise FileNotFoundError(f"{subject}/v{version}")
            raw = builtin.read_bytes()
            schema, validator = parse_and_compile(raw)
            self._validators[f"{subject}/v1"] = validator
            return Version(subject, 1, schema, raw, True)
        path = folder / f"v{version}.json"
        raw = read_regular(path, MAX_SCHEMA_BYTES)
        try:
            schema, validator = parse_and_compile(raw)
        except BadInput as exc:
            raise BadInput(f"{self.layout.relative(path)}: {exc.message}") from None
        self._validators[f"{subject}/v{version}"] = validator
        return Version(subject, version, schema, raw, False)

    def mode(self, subject: str) -> str:
        """The subject's compatibility mode (`subject.json`; default backward)."""
        folder = self._folder(subject)
        if folder is None:
            return "backward"
        path = folder / "subject.json"
        try:
            data = orjson.loads(read_regular(path, 64 * 1024))
        except FileNotFoundError:
            return "backward"
        except (ValueError, UnsafeFile) as exc:
            raise BadInput(f"{self.layout.relative(path)}: {exc}") from None
        mode = data.get("compatibility", "backward") if isinstance(data, dict) else None
        if mode not in MODES:
            raise BadInput(f"{self.layout.relative(path)}: bad compatibility {mode!r}")
        return str(mode)

    def latest(self, subject: str) -> Version | None:
        versions = self.versions(subject)
        return self.get(subject, versions[-1]) if versions else None

    def _stamp(self, subject: str) -> Any:
        try:
            info = os.lstat(self.root / subject)
            return (info.st_ino, info.st_mtime_ns)
        except FileNotFoundError:
            return None
        except OSError:
            return "odd"

    def validator_for(self, ref: str) -> Any:
        """The compiled validator for `<subject>/v<N>` (FileNotFoundError if not here)."""
        found = self._validators.get(ref)
        if found is None:
            self.get(*parse_ref(ref))  # compiles and caches it
            found = self._validators[ref]
        return found

    def current(self, subject: str) -> tuple[str, Any] | None:
        """(ref, validator) of the subject's latest version, or None without a schema."""
        stamp = self._stamp(subject)
        cached = self._latest.get(subject)
        if cached is not None and cached[0] == stamp and stamp != "odd":
            return cached[1]
        if stamp is None and not (BUILTIN_DIR / f"{subject}.json").is_file():
            found = None  # the common case: no schema, no import of the validator
        else:
            version = self.latest(subject)
            found = None if version is None else (version.ref, self.validator_for(version.ref))
        self._latest[subject] = (stamp, found)
        return found

    # --- checking payloads -------------------------------------------------------------

    def stamp(
        self,
        drafts: Iterable[Draft],
        *,
        required: bool = False,
        naming: Callable[[Draft], str | None] | None = None,
        numbered: bool = False,
    ) -> Iterator[Draft]:
        """The drafts, each checked against its subject's latest version and carrying
        that version (`schema`). Lazy, so a batch still goes in whole or not at all. The
        mesh's own topic is not checked."""
        for number, draft in enumerate(drafts, 1):
            try:
                yield self.check_draft(draft, required=required, naming=naming)
            except BadInput as exc:
                if not numbered:
                    raise
                raise BadInput(f"item {number}: {exc.message}") from None

    def check_draft(
        self,
        draft: Draft,
        *,
        required: bool = False,
        naming: Callable[[Draft], str | None] | None = None,
    ) -> Draft:
        if draft.topic == RESERVED_TOPIC:
            return draft
        subject = draft.routing_key
        if naming is not None:
            problem = naming(draft)
            if problem:
                raise BadInput(problem)
        found = self.current(subject)
        if found is None:
            if required:
                raise BadInput(
                    f"subject {subject!r} has no schema and the config says "
                    "[schemas] required = true; add one with mesh-schema add"
                )
            return draft._replace(schema=None) if draft.schema is not None else draft
        ref, validator = found
        problem = first_error(validator, draft.payload)
        if problem:
            raise BadInput(f"{problem} (schema {ref})")
        return draft._replace(schema=ref)

    def check_event(self, event: Envelope) -> str | None:
        """Why a stored or imported event does not match the version it names (None: it
        does, or names none). FileNotFoundError when that version has not arrived."""
        ref = event.get("schema")
        if ref is None:
            return None
        subject, _ = parse_ref(ref)
        if subject != f"{event['topic']}.{event['event_type']}":
            return f"names schema {ref} of another subject"
        problem = first_error(self.validator_for(ref), event["payload"])
        return None if problem is None else f"{problem} (schema {ref})"

    # --- adding versions ---------------------------------------------------------------

    def check_new(
        self,
        subject: str,
        raw: bytes,
        mode: str | None,
        events: Callable[[], Iterable[Envelope]],
    ) -> tuple[dict[str, Any], str, int]:
        """Whether `raw` may become the subject's next version: (schema, mode, version).
        BadInput names every incompatibility."""
        check_subject(subject)
        schema = parse_schema(raw)
        mode = check_mode(mode) if mode is not None else self.mode(subject)
        earlier = [self.get(subject, n) for n in self.versions(subject)]
        if len(earlier) >= MAX_VERSION:
            raise BadInput(f"subject {subject!r} has {MAX_VERSION} versions already")
        problems: list[str] = []
        if mode != "none":
            for old in earlier:
                for problem in incompatibilities(schema, old.schema, mode):
                    problems.append(f"{problem} (against v{old.version})")
        if mode in ("backward", "full"):
            validator = compile_validator(schema)
            for event in events():
                if f"{event['topic']}.{event['event_type']}" != subject:
                    continue
                failure = first_error(validator, event["payload"])
                if failure:
                    problems.append(f"stored event {event['event_id'][:16]} fails: {failure}")
                    break  # one is enough to show; the rest would say the same
        if problems:
            raise BadInput(
                f"schema for {subject!r} is not {mode} compatible: " + "; ".join(problems)
            )
        return schema, mode, (earlier[-1].version if earlier else 0) + 1

    def add(
        self,
        subject: str,
        raw: bytes,
        mode: str | None,
        events: Callable[[], Iterable[Envelope]],
    ) -> Version:
        """Write the next version (and the mode, when given) after `check_new`."""
        with FileLock(self.layout.locks_dir / "schemas.lock"):
            schema, mode, number = self.check_new(subject, raw, mode, events)
            builtin = self._folder(subject) is None and number == 2
            try:
                folder = plain_folder(self.layout.ledger_dir, ("schemas", subject), create=True)
            except UnsafeFile as exc:
                raise BadInput(
                    f"refusing to write: {self.layout.relative(exc.path)} {exc.message}"
                ) from None
            if builtin:  # the shipped v1 goes into the ledger, so that v2 travels with it
                atomic_write_bytes(
                    folder / "v1.json", (BUILTIN_DIR / f"{subject}.json").read_bytes()
                )
            rendered = dump_json_pretty(schema)
            atomic_write_bytes(folder / f"v{number}.json", rendered)
            if mode != "backward" or (folder / "subject.json").exists():
                atomic_write_bytes(
                    folder / "subject.json", dump_json_pretty({"compatibility": mode})
                )
            self._latest.pop(subject, None)
            return Version(subject, number, schema, rendered, False)


def problems_in_registry(
    registry: Registry,
) -> Iterator[tuple[str, str]]:
    """(where, problem) for everything wrong with the ledger's registry: odd names, schemas
    that do not parse, gaps in the versions, a version incompatible with an earlier one."""
    layout = registry.layout
    try:
        names = registry._listdir(None)
    except UnsafeFile as exc:
        yield layout.relative(exc.path), exc.message
        return
    for name in names:
        where = f"{layout.relative(registry.root)}/{name}"
        if not utf8_name(name) or not SUBJECT_RE.fullmatch(name):
            if not name.startswith("."):
                yield where, "is not named after a subject (a routing key)"
            continue
        try:
            files = registry._listdir(name)
        except (UnsafeFile, NotADirectoryError) as exc:
            yield where, getattr(exc, "message", "is not a plain folder")
            continue
        for file in files:
            if (
                file != "subject.json"
                and not file.startswith(".")
                and not VERSION_FILE_RE.fullmatch(file)
            ):
                yield f"{where}/{file}", "is not named v<N>.json or subject.json"
        try:
            mode = registry.mode(name)
        except BadInput as exc:
            yield where, exc.message
            mode = "backward"
        versions = registry.versions(name)
        if versions != list(range(1, len(versions) + 1)):
            yield where, f"versions {versions} are not 1..N without gaps"
        earlier: list[Version] = []
        for number in versions:
            try:
                version = registry.get(name, number)
            except (BadInput, OSError) as exc:
                yield f"{where}/v{number}.json", getattr(exc, "message", str(exc))
                continue
            if mode != "none":
                for old in earlier:
                    for problem in incompatibilities(version.schema, old.schema, mode):
                        yield (
                            f"{where}/v{number}.json",
                            f"not {mode} compatible with v{old.version}: {problem}",
                        )
            earlier.append(version)
