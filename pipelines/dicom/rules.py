"""Declarative series rules, evaluated on the attributes a PACS returns to a series C-FIND.

A rule is policy written as data in the protocol file (deid's recipes are the model): leaves test
one DICOM keyword (``regex``, ``equals``, ``in``, ``contains``, ``min``/``max``, ``present``),
``all`` / ``any`` / ``not`` combine them. Every match carries one sentence saying why, so a
reviewer can audit each selected or rejected series.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydicom.datadict import keyword_dict, tag_for_keyword

from cohortflow.pipelines.dicom.errors import ProtocolError, did_you_mean

#: DICOM keyword -> C-FIND value as plain Python; None, "" or [] when the PACS returned nothing.
Attributes = Mapping[str, object]

_KINDS = ("regex", "equals", "in", "contains", "min/max", "present", "all", "any", "not", "role")
_KEYS = (
    "field", "regex", "equals", "in", "contains", "min", "max", "present", "all", "any", "not",
    "role",
)  # fmt: skip
#: ``{role: NAME}`` -> its rule (the protocol file's roles section); None where roles are not
#: known (inside the roles section itself)
RoleLookup = Callable[[str, str], "Rule"]


@dataclass(frozen=True)
class Match:
    """Whether a rule matched, and why, in one sentence a reviewer understands."""

    matched: bool
    why: str


class Rule(ABC):
    """A condition on the C-FIND attributes of one series; immutable, shareable across threads."""

    @abstractmethod
    def evaluate(self, attrs: Attributes) -> Match:
        """Test the rule on one series' attributes."""

    @abstractmethod
    def fields(self) -> frozenset[str]:
        """The DICOM keywords the rule reads (to ask the PACS for them)."""


def _text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 3.0 and the DS string "3" compare equal
    return "" if value is None else str(value).strip()


def components(value: object) -> tuple[str, ...]:
    """The stripped components of a value; a string is split on the DICOM separator ``\\``."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split("\\"))
    if isinstance(value, (list, tuple)):
        return tuple(_text(item) for item in value)
    return (_text(value),)


@dataclass(frozen=True)
class Leaf(Rule):
    field: str

    def evaluate(self, attrs: Attributes) -> Match:
        parts = components(attrs.get(self.field))
        if not any(parts):
            return Match(False, f"{self.field} not returned by the PACS")
        return self._test(parts, "\\".join(parts))

    @abstractmethod
    def _test(self, parts: tuple[str, ...], text: str) -> Match: ...

    def fields(self) -> frozenset[str]:
        return frozenset({self.field})


@dataclass(frozen=True)
class Regex(Leaf):
    """``re.search`` on the value; multi-valued values joined with ``\\``."""

    pattern: re.Pattern[str]

    def _test(self, parts: tuple[str, ...], text: str) -> Match:
        hit = self.pattern.search(text) is not None
        how = "matches" if hit else "does not match"
        return Match(hit, f"{self.field} '{text}' {how} /{self.pattern.pattern}/")


@dataclass(frozen=True)
class Equals(Leaf):
    """The stripped value (joined when multi-valued) equals ``value``, case-sensitive."""

    value: str

    def _test(self, parts: tuple[str, ...], text: str) -> Match:
        if text == self.value:
            return Match(True, f"{self.field} is '{text}'")
        return Match(False, f"{self.field} '{text}' is not '{self.value}'")


@dataclass(frozen=True)
class OneOf(Leaf):
    """The stripped value (joined when multi-valued) is one of ``values``, case-sensitive."""

    values: tuple[str, ...]

    def _test(self, parts: tuple[str, ...], text: str) -> Match:
        hit = text in self.values
        how = "is one of" if hit else "is not one of"
        return Match(hit, f"{self.field} '{text}' {how} {', '.join(self.values)}")


@dataclass(frozen=True)
class Contains(Leaf):
    """``value`` is one of the components of a multi-valued value (ImageType, ScanningSequence)."""

    value: str

    def _test(self, parts: tuple[str, ...], text: str) -> Match:
        if self.value in parts:
            return Match(True, f"{self.field} contains {self.value}")
        return Match(False, f"{self.field} '{text}' does not contain {self.value}")


@dataclass(frozen=True)
class Range(Leaf):
    """A single numeric value (numbers or numeric strings) within the inclusive bounds."""

    minimum: float | None
    maximum: float | None

    def _test(self, parts: tuple[str, ...], text: str) -> Match:
        try:
            number = float(parts[0]) if len(parts) == 1 else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            return Match(False, f"{self.field} '{text}' is not a number")
        low, high = self.minimum, self.maximum
        ok = (low is None or number >= low) and (high is None or number <= high)
        if low is not None and high is not None:
            how = f"{'within' if ok else 'outside'} [{low!r}, {high!r}]"
        elif low is not None:
            how = f"{'>=' if ok else '<'} {low!r}"
        else:
            how = f"{'<=' if ok else '>'} {high!r}"
        return Match(ok, f"{self.field} {number!r} {how}")


@dataclass(frozen=True)
class Present(Leaf):
    """Whether the PACS returned a non-empty value (``present: false`` matches a missing one)."""

    present: bool

    def evaluate(self, attrs: Attributes) -> Match:
        found = Leaf.evaluate(self, attrs)
        return Match(found.matched == self.present, found.why)

    def _test(self, parts: tuple[str, ...], text: str) -> Match:
        return Match(True, f"{self.field} '{text}' returned by the PACS")


@dataclass(frozen=True)
class AllOf(Rule):
    rules: tuple[Rule, ...]

    def evaluate(self, attrs: Attributes) -> Match:
        whys = []
        for rule in self.rules:
            verdict = rule.evaluate(attrs)
            if not verdict.matched:
                return verdict
            whys.append(verdict.why)
        return Match(True, " and ".join(whys))

    def fields(self) -> frozenset[str]:
        return frozenset().union(*(rule.fields() for rule in self.rules))


@dataclass(frozen=True)
class AnyOf(Rule):
    rules: tuple[Rule, ...]

    def evaluate(self, attrs: Attributes) -> Match:
        whys = []
        for rule in self.rules:
            verdict = rule.evaluate(attrs)
            if verdict.matched:
                return verdict
            whys.append(verdict.why)
        return Match(False, f"none of: {'; '.join(whys)}")

    def fields(self) -> frozenset[str]:
        return frozenset().union(*(rule.fields() for rule in self.rules))


@dataclass(frozen=True)
class Not(Rule):
    rule: Rule

    def evaluate(self, attrs: Attributes) -> Match:
        # The inner why already states the fact that decides ("Modality 'OT' is not 'MR'");
        # wrapping it in "not (...)" would read as its opposite.
        verdict = self.rule.evaluate(attrs)
        return Match(not verdict.matched, verdict.why)

    def fields(self) -> frozenset[str]:
        return self.rule.fields()


def parse_rule(data: object, where: str, roles: RoleLookup | None = None) -> Rule:
    """Build a rule from its YAML data; ``where`` is its dotted location for error messages;
    ``roles`` resolves ``{role: NAME}`` leaves."""
    if not isinstance(data, Mapping):
        raise ProtocolError(
            f"{where}: a rule must be a mapping such as {{field: Modality, equals: MR}}, "
            f"not {data!r}"
        )
    for key in data:
        if key not in _KEYS:
            raise ProtocolError(
                f"{where}.{key}: unknown rule key{did_you_mean(str(key), _KEYS)}; "
                f"use one of {', '.join(_KEYS)}"
            )
    kinds = list(
        dict.fromkeys("min/max" if k in ("min", "max") else k for k in data if k != "field")
    )
    if len(kinds) != 1:
        found = f"{len(kinds)} rule kinds ({', '.join(kinds)})" if kinds else "no rule kind"
        raise ProtocolError(
            f"{where}: {found}; give exactly one of {', '.join(_KINDS)} per mapping "
            "(combine several with all: [...])"
        )
    kind = kinds[0]
    if kind == "role":
        if "field" in data:
            raise ProtocolError(f"{where}: 'role' takes no field")
        if roles is None:
            raise ProtocolError(
                f"{where}: a role rule belongs in a protocol's series rules, not in the roles "
                "section"
            )
        return roles(_value(data["role"], f"{where}.role"), where)
    if kind in ("all", "any", "not"):
        if "field" in data:
            raise ProtocolError(f"{where}: '{kind}' takes no field; put it in the inner rules")
        if kind == "not":
            return Not(parse_rule(data["not"], f"{where}.not", roles))
        items = data[kind]
        if not isinstance(items, list) or not items:
            raise ProtocolError(f"{where}.{kind}: give a non-empty list of rules")
        rules = tuple(
            parse_rule(item, f"{where}.{kind}[{i}]", roles) for i, item in enumerate(items)
        )
        return AllOf(rules) if kind == "all" else AnyOf(rules)
    field = _keyword(data.get("field"), f"{where}.field")
    at = f"{where}.{kind}"
    if kind == "regex":
        pattern = data["regex"]
        if not isinstance(pattern, str) or not pattern:
            raise ProtocolError(f"{at}: give the regular expression as a string")
        try:
            return Regex(field, re.compile(pattern))
        except re.error as exc:
            raise ProtocolError(f"{at}: invalid regular expression {pattern!r} ({exc})") from None
    if kind == "equals":
        return Equals(field, _value(data["equals"], at))
    if kind == "contains":
        return Contains(field, _value(data["contains"], at))
    if kind == "in":
        values = data["in"]
        if not isinstance(values, list) or not values:
            raise ProtocolError(f"{at}: give a non-empty list of values")
        return OneOf(field, tuple(_value(v, f"{at}[{i}]") for i, v in enumerate(values)))
    if kind == "present":
        if not isinstance(data["present"], bool):
            raise ProtocolError(f"{at}: write present: true or present: false")
        return Present(field, data["present"])
    low, high = (_number(data[k], f"{where}.{k}") if k in data else None for k in ("min", "max"))
    if low is not None and high is not None and low > high:
        raise ProtocolError(f"{where}: min {low!r} is greater than max {high!r}; swap them")
    return Range(field, low, high)


def _keyword(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{where}: give the DICOM keyword the rule reads, e.g. Modality")
    if tag_for_keyword(value) is None:
        raise ProtocolError(
            f"{where}: {value!r} is not a DICOM keyword{did_you_mean(value, keyword_dict)}; "
            "spell it as the DICOM standard does (e.g. SeriesDescription)"
        )
    return value


def _value(value: object, where: str) -> str:
    text = _text(value)
    if isinstance(value, (bool, list, dict)) or not text:
        raise ProtocolError(f"{where}: give one non-empty value (text or number), not {value!r}")
    return text


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{where}: give a number, not {value!r}")
    return float(value)
