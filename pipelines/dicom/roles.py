"""Series roles from acquisition physics, names second.

A series' role (3D T1, post-contrast T1, FLAIR, T2, DWI, localizer, ...) is decided by the
``roles`` section of the protocol file: policy, in order, the first role that matches wins. Each
role has a ``match`` rule over the header (MRAcquisitionType, ScanningSequence, SequenceVariant,
TR, TE, TI, flip angle, ImageType, contrast agent ...) and may have a ``names`` rule (series
description, protocol name, the vendor's sequence name).

The physics decide where the header carries them. A header may lack them: a PACS answers a
series C-FIND with what it keeps, an index row holds what was read. So ``match`` is judged with
three values: a rule that reads a *physics field* (``roles.physics_fields``) which the header
lacks is *unknown*, not false. Then, and only then, the role's names decide. A name never
overrides physics that were read: a series called "MPRAGE" with a TE of 90 ms is not a 3D T1,
and the evidence says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cohortflow.pipelines.dicom.errors import ProtocolError, did_you_mean
from cohortflow.pipelines.dicom.rules import (
    AllOf,
    AnyOf,
    Attributes,
    Leaf,
    Match,
    Not,
    Present,
    Rule,
    components,
    parse_rule,
)

#: The role of a series no role matched.
OTHER = "other"
#: The attributes every classification reports, whatever its rules read.
SUMMARY_FIELDS = (
    "MRAcquisitionType",
    "ScanningSequence",
    "SequenceVariant",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
)
_SHORT = {"MRAcquisitionType": "", "RepetitionTime": "TR ", "EchoTime": "TE ",
          "InversionTime": "TI ", "FlipAngle": "flip "}  # fmt: skip


@dataclass(frozen=True)
class RoleSpec:
    name: str
    title: str
    match: Rule
    names: Rule | None = None


@dataclass(frozen=True)
class SeriesRole:
    """The role of one series and the evidence for it, in sentences a reviewer reads."""

    role: str
    #: "match" (the role's match rule held on the header: its physics, or a tag that names the
    #: role), "names" (the header lacks the physics, the names decided) or "none" (no role)
    by: str
    evidence: str
    #: the acquisition as read: "3D GR\\IR SP\\MP TR 2300 TE 2.98 TI 900 flip 9"
    acquisition: str = ""
    #: roles the names suggested but the physics ruled out, with the reason
    ruled_out: tuple[str, ...] = ()

    def explain(self) -> str:
        """One line: the role, how it was decided, and the evidence."""
        text = f"role {self.role} by {self.by}: {self.evidence}"
        if self.acquisition:
            text += f" [{self.acquisition}]"
        if self.ruled_out:
            text += "; " + "; ".join(self.ruled_out)
        return text

    def as_dict(self) -> dict[str, object]:
        return {
            "role": self.role,
            "by": self.by,
            "evidence": self.evidence,
            "acquisition": self.acquisition,
            "ruled_out": list(self.ruled_out),
        }


def judge(rule: Rule, attrs: Attributes, physics: frozenset[str]) -> tuple[bool | None, str]:
    """Three-valued evaluation: True, False, or None when a physics field the rule needs is
    missing (Kleene's logic: ``all`` is false if any part is false, ``any`` true if any is)."""
    if isinstance(rule, AllOf):
        unknown: str | None = None
        whys = []
        for part in rule.rules:
            value, why = judge(part, attrs, physics)
            if value is False:
                return False, why
            if value is None and unknown is None:
                unknown = why
            whys.append(why)
        return (None, unknown) if unknown is not None else (True, " and ".join(whys))
    if isinstance(rule, AnyOf):
        unknown = None
        whys = []
        for part in rule.rules:
            value, why = judge(part, attrs, physics)
            if value is True:
                return True, why
            if value is None and unknown is None:
                unknown = why
            whys.append(why)
        return (None, unknown) if unknown is not None else (False, f"none of: {'; '.join(whys)}")
    if isinstance(rule, Not):
        value, why = judge(rule.rule, attrs, physics)
        return (None if value is None else not value), why
    if (
        isinstance(rule, Leaf)
        and not isinstance(rule, Present)
        and rule.field in physics
        and not any(components(attrs.get(rule.field)))
    ):
        return None, f"{rule.field} not in the header"
    verdict = rule.evaluate(attrs)
    return verdict.matched, verdict.why


def acquisition(attrs: Attributes) -> str:
    """The acquisition physics of a series in one short line."""
    parts = []
    for keyword in SUMMARY_FIELDS:
        values = [v for v in components(attrs.get(keyword)) if v]
        if values:
            parts.append(f"{_SHORT.get(keyword, '')}{chr(92).join(values)}")
    return " ".join(parts)


@dataclass(frozen=True)
class RoleSet:
    """The ``roles`` section of a protocol file: ordered roles, and the physics fields whose
    absence makes a rule unknown rather than false."""

    roles: tuple[RoleSpec, ...]
    physics: frozenset[str]
    source: str = ""

    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.roles)

    def title(self, role: str) -> str:
        return next((s.title for s in self.roles if s.name == role), "no role matched")

    def fields(self) -> frozenset[str]:
        """Every keyword the roles read (to ask a PACS for them)."""
        rules = [r for s in self.roles for r in (s.match, s.names) if r is not None]
        return frozenset(SUMMARY_FIELDS).union(*(r.fields() for r in rules))

    def classify(self, attrs: Attributes) -> SeriesRole:
        """The first role whose physics match; where a role's physics are unknown for this
        header, its names decide."""
        ruled_out: list[str] = []
        summary = acquisition(attrs)
        for spec in self.roles:
            value, why = judge(spec.match, attrs, self.physics)
            if value is True:
                return SeriesRole(spec.name, "match", why, summary, tuple(ruled_out))
            named = spec.names.evaluate(attrs) if spec.names is not None else None
            if value is None and named is not None and named.matched:
                evidence = f"{named.why} (physics unknown: {why})"
                return SeriesRole(spec.name, "names", evidence, summary, tuple(ruled_out))
            if value is False and named is not None and named.matched:
                ruled_out.append(f"not {spec.name} although {named.why}: {why}")
        return SeriesRole(
            OTHER, "none", "no role's physics or names matched", summary, tuple(ruled_out)
        )

    def rule(self, role: str, where: str) -> Rule:
        """The protocol rule ``{role: NAME}``: the series' role is NAME."""
        if role not in self.names():
            raise ProtocolError(
                f"{where}.role: {role!r} is not a role of the roles section"
                f"{did_you_mean(str(role), self.names())}; roles: {', '.join(self.names())}"
            )
        return HasRole(role, self)


@dataclass(frozen=True, eq=False)
class HasRole(Rule):
    """A protocol rule: the series' role (decided by the roles section) is ``role``."""

    role: str
    roles: RoleSet

    def evaluate(self, attrs: Attributes) -> Match:
        decided = self.roles.classify(attrs)
        if decided.role == self.role:
            return Match(True, f"role {self.role} by {decided.by}: {decided.evidence}")
        return Match(False, f"role is {decided.role}, not {self.role} ({decided.evidence})")

    def fields(self) -> frozenset[str]:
        return self.roles.fields()


_ROLE_KEYS = ("title", "match", "names")


def parse_roles(data: object, source: str) -> RoleSet:
    """The ``roles`` section: ``physics_fields`` (a list of keywords) and ``rules`` (role name ->
    title, match, names), in order."""
    if not isinstance(data, Mapping) or set(data) - {"physics_fields", "rules"}:
        raise ProtocolError("roles: expected a mapping with physics_fields and rules")
    physics = data.get("physics_fields") or []
    if not isinstance(physics, list) or not all(isinstance(p, str) for p in physics):
        raise ProtocolError("roles.physics_fields: give a list of DICOM keywords")
    rules = data.get("rules")
    if not isinstance(rules, Mapping) or not rules:
        raise ProtocolError("roles.rules: define at least one role")
    specs = []
    for name, spec in rules.items():
        where = f"roles.rules.{name}"
        if name == OTHER:
            raise ProtocolError(f"{where}: '{OTHER}' is the role of what no rule matches")
        if not isinstance(spec, Mapping) or "match" not in spec or "title" not in spec:
            raise ProtocolError(f"{where}: give a title and a match rule (names is optional)")
        for key in spec:
            if key not in _ROLE_KEYS:
                raise ProtocolError(
                    f"{where}.{key}: unknown key{did_you_mean(str(key), _ROLE_KEYS)}; allowed "
                    f"here: {', '.join(_ROLE_KEYS)}"
                )
        names = spec.get("names")
        specs.append(
            RoleSpec(
                str(name),
                str(spec["title"]),
                parse_rule(spec["match"], f"{where}.match"),
                parse_rule(names, f"{where}.names") if names is not None else None,
            )
        )
    for keyword in physics:
        parse_rule({"field": keyword, "present": True}, "roles.physics_fields")  # a real keyword
    return RoleSet(tuple(specs), frozenset(physics), source)
