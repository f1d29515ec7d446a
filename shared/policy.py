"""Consent, retention and privacy policies: YAML files, validated at start-up, refused with the file and line at fault.

`policies/consent.yaml` names the purposes a person can consent to, who may grant each, and for how long a grant
may last. `policies/retention.yaml` says how long each kind of data is kept. `policies/privacy.yaml` sets the
epsilon budgets per photo, per person and per site. A policy's version is the sha256 of
its file bytes; every consent receipt and audit entry records the version it was made under.

Line numbers come from the YAML node marks (the composed node tree is walked beside the constructed data), so a
pydantic error's location maps back to the line of the key or value it concerns.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import ConfigError

GrantorRole = Literal["subject", "guardian", "legal_representative", "site_operator"]
"""Who may grant consent: the person, a guardian of a minor, a legal representative, or the site operator acting on
a signed paper form."""

DataKind = Literal["source_photos", "face_crops", "personal_adapters", "render_payloads", "outputs", "audit_log"]
DATA_KINDS: tuple[str, ...] = DataKind.__args__  # type: ignore[attr-defined]

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w|y)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


class PolicyError(ConfigError):
    """A policy file is invalid. `path` and `line` (1-based, None when the whole file is at fault) say where."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line
        self.detail = message


def parse_duration(value: object) -> timedelta:
    """'90s', '15m', '12h', '30d', '6w', '7y' (365-day years) -> timedelta; anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"a duration must be a string like '30d' or '12h', got {value!r}")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration: use a whole number and one of s, m, h, d, w, y (e.g. '30d')")
    seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be longer than zero")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A policy duration written as '30d', '12h', ... (see `parse_duration`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PurposeRule(_Strict):
    """One consent purpose: what it allows, who may grant it, and the longest a grant may last."""

    description: str = Field(min_length=1)
    granted_by: tuple[GrantorRole, ...] = Field(min_length=1)
    max_validity: Duration
    requires: tuple[str, ...] = ()
    """Other purposes that must be consented to as well (e.g. render needs personal_adapter or a crop payload)."""


class ConsentPolicyModel(_Strict):
    version: Literal[1]
    site_retention_of_receipts: Duration
    """How long a revoked or expired receipt is kept as proof before it is deleted."""
    purposes: dict[str, PurposeRule] = Field(min_length=1)

    def cross_check(self) -> list[tuple[tuple[Any, ...], str]]:
        """Checks across purposes, as (location, message) so that they map to a line like field errors."""
        errors = []
        for name, rule in self.purposes.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                errors.append((("purposes", name), f"purpose name {name!r} must be lower_snake_case"))
            for i, req in enumerate(rule.requires):
                if req not in self.purposes:
                    errors.append((("purposes", name, "requires", i), f"requires unknown purpose {req!r}"))
                elif req == name:
                    errors.append((("purposes", name, "requires", i), "a purpose cannot require itself"))
        return errors


class RetentionRule(_Strict):
    """How long one kind of data is kept; `delete_on_revocation` also removes it when consent is withdrawn."""

    keep: Duration
    delete_on_revocation: bool = True


class RetentionKinds(_Strict):
    source_photos: RetentionRule
    face_crops: RetentionRule
    personal_adapters: RetentionRule
    render_payloads: RetentionRule
    outputs: RetentionRule
    audit_log: RetentionRule


class SweepRule(_Strict):
    interval: Duration
    on_startup: bool = True


class RetentionPolicyModel(_Strict):
    version: Literal[1]
    kinds: RetentionKinds
    sweep: SweepRule


class PrivacyBudgets(_Strict):
    """Epsilon budgets, one per unit of protection (see deploy/docs/privacy.md)."""

    per_photo: float = Field(gt=0)
    """Local DP-SGD at the site, composed over every training run on its photos (global rounds and personal
    adapters): what anyone who sees a site's update or a personal adapter can learn about one photo."""
    per_person: float = Field(gt=0)
    """All of one person's photos at a site together, for the global adapter: the smaller of the group-privacy
    figure of the local DP-SGD and the per-site figure."""
    per_site: float = Field(gt=0)
    """The federation's Gaussian noise on the sum of the sites' clipped updates, over a site's rounds: what the
    global adapter (and, under SecAgg+, the coordinator) can learn about everything one site contributed."""


class PrivacyPolicyModel(_Strict):
    version: Literal[1]
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "prv"]
    budgets: PrivacyBudgets


@dataclass(frozen=True)
class PrivacyPolicy:
    """The validated privacy policy; `version_hash` is the sha256 of the file bytes."""

    path: Path
    version_hash: str
    rules: PrivacyPolicyModel

    @property
    def budgets(self) -> PrivacyBudgets:
        return self.rules.budgets


@dataclass(frozen=True)
class ConsentPolicy:
    """The validated consent policy; `version_hash` is the sha256 of the file bytes."""

    path: Path
    version_hash: str
    rules: ConsentPolicyModel

    @property
    def purposes(self) -> dict[str, PurposeRule]:
        return self.rules.purposes

    def purpose(self, name: str) -> PurposeRule:
        try:
            return self.rules.purposes[name]
        except KeyError:
            known = ", ".join(sorted(self.rules.purposes))
            raise PolicyError(self.path, None, f"no consent purpose {name!r} (known: {known})") from None


@dataclass(frozen=True)
class RetentionPolicy:
    """The validated retention policy; `version_hash` is the sha256 of the file bytes."""

    path: Path
    version_hash: str
    rules: RetentionPolicyModel

    def rule(self, kind: str) -> RetentionRule:
        if kind not in DATA_KINDS:
            raise PolicyError(self.path, None, f"no retention rule for data kind {kind!r} (known: {', '.join(DATA_KINDS)})")
        return getattr(self.rules.kinds, kind)

    def keep(self, kind: str) -> timedelta:
        return self.rule(kind).keep


@dataclass(frozen=True)
class Policies:
    consent: ConsentPolicy
    retention: RetentionPolicy


# --- YAML with line numbers -------------------------------------------------------------------------------------

_Lines = dict[tuple[Any, ...], tuple[int, int]]
"""path of keys/indices -> (line of the key, line of the value), 1-based."""


def _walk(node: yaml.Node, path: tuple[Any, ...], lines: _Lines, file: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise PolicyError(file, key_node.start_mark.line + 1, f"duplicate key {key!r} (first at line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
            lines[path + (key,)] = (key_node.start_mark.line + 1, value_node.start_mark.line + 1)
            _walk(value_node, path + (key,), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = (item.start_mark.line + 1, item.start_mark.line + 1)
            _walk(item, path + (i,), lines, file)


def _load_yaml_with_lines(path: Path) -> tuple[bytes, Any, _Lines]:
    if not path.is_file():
        raise PolicyError(path, None, "policy file does not exist")
    raw = path.read_bytes()
    loader = yaml.SafeLoader(raw.decode("utf-8", errors="strict"))
    try:
        node = loader.get_single_node()
        if node is None:
            raise PolicyError(path, None, "policy file is empty")
        lines: _Lines = {(): (node.start_mark.line + 1, node.start_mark.line + 1)}
        _walk(node, (), lines, path)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise PolicyError(path, mark.line + 1 if mark else None, f"not valid YAML: {exc.problem}") from exc
    finally:
        loader.dispose()
    return raw, data, lines


def _line_for(loc: tuple[Any, ...], lines: _Lines, unknown_key: bool) -> int | None:
    """The line of the deepest part of `loc` the file has: the key itself for an unknown key, else its value."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            key_line, value_line = lines[loc]
            return key_line if unknown_key else value_line
        loc = loc[:-1]
    return lines.get((), (None, None))[0]


_M = TypeVar("_M", bound=BaseModel)


def _validate(path: Path, model: type[_M]) -> tuple[str, _M]:
    raw, data, lines = _load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise PolicyError(path, 1, "top level must be a mapping")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            msg = {"extra_forbidden": "unknown key (not allowed here)", "missing": "required key is missing"}.get(err["type"], err["msg"])
            found.append((tuple(err["loc"]), msg, err["type"] == "extra_forbidden"))
        _raise_at_lines(path, lines, found)
    cross = getattr(parsed, "cross_check", None)
    if cross is not None and (problems := cross()):
        _raise_at_lines(path, lines, [(loc, msg, False) for loc, msg in problems])
    return hashlib.sha256(raw).hexdigest(), parsed


def _raise_at_lines(path: Path, lines: _Lines, found: list[tuple[tuple[Any, ...], str, bool]]) -> None:
    """Raise one PolicyError at the first line at fault, listing the others in the message."""
    parts = sorted(((_line_for(loc, lines, is_key), ".".join(map(str, loc)) or "<top>", msg) for loc, msg, is_key in found),
                   key=lambda p: p[0] or 0)  # fmt: skip
    text = f"{parts[0][1]}: {parts[0][2]}"
    if len(parts) > 1:
        text += "; also " + "; ".join(f"line {ln}: {where}: {msg}" for ln, where, msg in parts[1:])
    raise PolicyError(path, parts[0][0], text)


def load_consent_policy(path: str | Path) -> ConsentPolicy:
    """Read and validate a consent policy file; raises PolicyError naming the file and line at fault."""
    p = Path(path)
    digest, rules = _validate(p, ConsentPolicyModel)
    return ConsentPolicy(path=p, version_hash=digest, rules=rules)


def load_retention_policy(path: str | Path) -> RetentionPolicy:
    """Read and validate a retention policy file; raises PolicyError naming the file and line at fault."""
    p = Path(path)
    digest, rules = _validate(p, RetentionPolicyModel)
    return RetentionPolicy(path=p, version_hash=digest, rules=rules)


def load_privacy_policy(path: str | Path) -> PrivacyPolicy:
    """Read and validate a privacy policy file (epsilon budgets); raises PolicyError naming the file and line."""
    p = Path(path)
    digest, rules = _validate(p, PrivacyPolicyModel)
    return PrivacyPolicy(path=p, version_hash=digest, rules=rules)


DEFAULT_PRIVACY_POLICY = Path(__file__).resolve().parents[1] / "policies" / "privacy.yaml"
"""The checkout's privacy policy, used where no other file is named."""


def load_policies(consent_file: str | Path, retention_file: str | Path) -> Policies:
    """Both policies, as every component loads them at start-up (from `Settings.policy`)."""
    return Policies(consent=load_consent_policy(consent_file), retention=load_retention_policy(retention_file))
