"""The protocol file: which studies a protocol selects from the PACS, and which of their series.

The file is policy, versioned and reviewed like code (``data/protocols.yaml`` is the shipped
default). It is validated completely on load: a typo is an error naming the file and the dotted
location, never a rule that silently matches nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import yaml

from cohortflow.pipelines.dicom.errors import ProtocolError, did_you_mean
from cohortflow.pipelines.dicom.roles import RoleSet, parse_roles
from cohortflow.pipelines.dicom.rules import Attributes, Rule, parse_rule
from cohortflow.qc.policy import PolicyError, QcPolicy, parse_policy

VERSION = 1
NO_INCLUDE_RULE = "no_include_rule"
#: The protocol of a folder whose study matches no protocol: every role, the shared QC policy.
AUTO = "auto"
#: Series attributes every selection reports, whatever its rules read.
BASE_SERIES_FIELDS = frozenset(
    {
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "ProtocolName",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    }
)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")  # a CS value


@cache
def _wildcard(pattern: str) -> re.Pattern[str]:
    """DICOM C-FIND wildcard matching: only ``*`` and ``?`` are special (``[`` is literal)."""
    body = "".join({"*": ".*", "?": "."}.get(c, re.escape(c)) for c in pattern)
    return re.compile(body, re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class StudyQuery:
    """The study-level C-FIND keys of a protocol: ModalitiesInStudy and StudyDescription."""

    modality: str
    description: tuple[str, ...]  # wildcard patterns, one C-FIND each; () = any description

    def matches_description(self, value: str | None) -> bool:
        """Check a returned StudyDescription client-side, case-insensitively.

        PACS differ in case sensitivity and in which keys they filter on at all.
        """
        if not self.description:
            return True
        text = (value or "").strip()
        return any(_wildcard(pattern).fullmatch(text) for pattern in self.description)


@dataclass(frozen=True)
class SeriesDecision:
    selected: bool
    rule: str  # the include rule that selected it, or the exclusion / NO_INCLUDE_RULE
    why: str


@dataclass(frozen=True)
class StudyDecision:
    selected: bool
    why: str
    series: tuple[tuple[str, SeriesDecision], ...]  # (SeriesInstanceUID, decision), in order


@dataclass(frozen=True)
class Protocol:
    """One protocol: the studies it asks the PACS for and the rules deciding their series."""

    name: str
    title: str
    study: StudyQuery
    include: tuple[tuple[str, Rule], ...]  # ordered: the first match names the series' role
    exclude: tuple[tuple[str, Rule], ...]  # the shared exclusions first, then the protocol's own
    require: tuple[str, ...]
    #: how header and image QC judge the protocol's series (the shared ``qc`` section with the
    #: protocol's own changes merged over it)
    qc: QcPolicy = field(default_factory=QcPolicy)
    #: the series roles, to say what a series no include rule took is
    roles: RoleSet | None = None

    def classify_series(self, attrs: Attributes) -> SeriesDecision:
        """Exclusions first (the first match rejects), then the include rules in order."""
        for name, rule in self.exclude:
            verdict = rule.evaluate(attrs)
            if verdict.matched:
                return SeriesDecision(False, name, verdict.why)
        for name, rule in self.include:
            verdict = rule.evaluate(attrs)
            if verdict.matched:
                return SeriesDecision(True, name, verdict.why)
        why = "no include rule matched"
        if self.roles is not None:
            why += f"; {self.roles.classify(attrs).explain()}"
        return SeriesDecision(False, NO_INCLUDE_RULE, why)

    def decide_study(self, series: Sequence[tuple[str, Attributes]]) -> StudyDecision:
        """Classify each series (keyed by SeriesInstanceUID); select the study when every
        required include rule selected at least one series."""
        decisions = tuple((uid, self.classify_series(attrs)) for uid, attrs in series)
        counts = Counter(d.rule for _, d in decisions if d.selected)
        missing = [name for name in self.require if not counts[name]]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            why = f"no series matched required rule{plural} {', '.join(missing)}"
        else:
            why = ", ".join(
                f"{name}: {counts[name]} series" for name, _ in self.include if counts[name]
            )
        return StudyDecision(not missing, why, decisions)

    def series_fields(self) -> frozenset[str]:
        """The keywords to ask the PACS for at series level."""
        rules = (rule for _, rule in (*self.include, *self.exclude))
        return BASE_SERIES_FIELDS.union(*(rule.fields() for rule in rules))


@dataclass(frozen=True)
class ProtocolSet:
    version: int
    source: str  # the file it was loaded from
    protocols: Mapping[str, Protocol]
    #: SHA-256 of the file's text: tells whether the rules changed
    sha256: str = ""
    #: the series roles (the file's roles section, else the shipped one)
    roles: RoleSet | None = None
    #: the shared exclusions and QC policy, for the protocol of studies no protocol matches
    exclude: tuple[tuple[str, Rule], ...] = ()
    qc: QcPolicy = field(default_factory=QcPolicy)

    def auto(self) -> Protocol:
        """The protocol of a study no protocol's description matches (a folder given on the
        command line): every series gets its role from its acquisition physics, the shared
        exclusions and QC policy apply, and no role is required (the folder is what the user
        gave; a study without a 3D T1 is still checked and converted)."""
        assert self.roles is not None, "a loaded protocol set has roles"
        include = tuple((name, self.roles.rule(name, "auto")) for name in self.roles.names())
        return Protocol(
            AUTO,
            "No protocol: series roles from their acquisition physics",
            StudyQuery("MR", ()),
            include,
            self.exclude,
            (),
            self.qc,
            self.roles,
        )

    def get(self, name: str) -> Protocol:
        """The protocol called ``name``; ProtocolError listing the known ones otherwise."""
        if name in self.protocols:
            return self.protocols[name]
        if name == AUTO and self.roles is not None:
            return self.auto()
        raise ProtocolError(
            f"{self.source}: unknown protocol {name!r}{did_you_mean(name, self.protocols)}; "
            f"known protocols: {', '.join(self.protocols)}"
        )

    def choose(self, name: str | None, study_description: str) -> Protocol:
        """``name``'s protocol, else the first whose study-description patterns match, else the
        automatic one (every series by its role from the acquisition physics): how a folder's
        study is given its protocol by every stage."""
        if name is not None:
            return self.get(name)
        for protocol in self.protocols.values():
            if protocol.study.description and protocol.study.matches_description(study_description):
                return protocol
        return self.auto()

    def qc_of(self, name: str | None) -> QcPolicy:
        """The QC policy (check severities included) of protocol ``name``; the shared one for
        a series no protocol chose."""
        if name and name in self.protocols:
            return self.protocols[name].qc
        return self.qc

    def with_role(self, role: str) -> Protocol:
        """The first protocol with an include rule called ``role`` (e.g. ``t1_3d``)."""
        for protocol in self.protocols.values():
            if any(name == role for name, _ in protocol.include):
                return protocol
        raise ProtocolError(f"{self.source}: no protocol has an include rule called {role!r}")


def load_protocols(path: Path | None = None) -> ProtocolSet:
    """Load and validate a protocol file: ``path``, else the one shipped with cohortflow. Kept
    per process while the file stays as it was (its size and modification time): each step of
    a run reads it, and parsing and validating took a quarter of a second each time."""
    if path is not None:
        try:
            stat = path.stat()
        except OSError:
            return _load_protocols(path)  # says why it cannot be read
        return _load_protocols_kept(path, stat.st_mtime_ns, stat.st_size)
    return _load_shipped()


@lru_cache(maxsize=8)
def _load_protocols_kept(path: Path, mtime_ns: int, size: int) -> ProtocolSet:
    _ = mtime_ns, size  # the key: a changed file is read again
    return _load_protocols(path)


@cache
def _load_shipped() -> ProtocolSet:
    return _load_protocols(None)


def _load_protocols(path: Path | None) -> ProtocolSet:
    if path is None:
        resource = resources.files("cohortflow.pipelines.dicom").joinpath("data/protocols.yaml")
        source, text = str(resource), resource.read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"{source}: cannot read the protocol file ({exc})") from exc
    try:
        loaded = _protocol_set(yaml.load(text, Loader=_StrictLoader), source, path is None)
        return replace(loaded, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}:" if mark else ""
        problem = exc.problem or exc.context
        raise ProtocolError(f"{source}:{line} invalid YAML ({problem}); fix it there") from None
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{source}: invalid YAML ({exc})") from None
    except ProtocolError as exc:
        raise ProtocolError(f"{source}: {exc}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys, which PyYAML would silently resolve to the last."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> object:
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key.value!r}", key.start_mark
                )
            seen.add(key.value)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def _fields(
    data: object, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, object]:
    """``data`` as a mapping with only the allowed keys and all the required ones."""
    label = where or "top level"
    allowed = (*required, *optional)
    if not isinstance(data, dict):
        raise ProtocolError(f"{label}: expected a mapping with {', '.join(allowed)}")
    for key in data:
        if key not in allowed:
            at = f"{where}.{key}" if where else str(key)
            raise ProtocolError(
                f"{at}: unknown key{did_you_mean(str(key), allowed)}; allowed here: "
                f"{', '.join(allowed)}"
            )
    for key in required:
        if key not in data:
            raise ProtocolError(f"{label}: missing {key!r}; add it")
    return data


def _names(data: object, where: str, what: str) -> Mapping[str, object]:
    """A mapping of names (protocols, rules) to their definitions."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a mapping of {what} names to definitions")
    for name in data:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == NO_INCLUDE_RULE:
            raise ProtocolError(
                f"{where}: {name!r} is not a valid {what} name; use letters, digits, _ and -, "
                f"starting with a letter (and not {NO_INCLUDE_RULE})"
            )
    return data


def _rules(data: object, where: str, roles: RoleSet) -> dict[str, Rule]:
    return {
        name: parse_rule(rule, f"{where}.{name}", roles.rule)
        for name, rule in _names(data, where, "rule").items()
    }


@cache
def _shipped_roles() -> RoleSet:
    """The roles of the shipped protocol file, for files without a roles section."""
    shipped = load_protocols()
    assert shipped.roles is not None
    return shipped.roles


def _protocol_set(data: object, source: str, shipped: bool = False) -> ProtocolSet:
    top = _fields(data, "", ("version", "protocols"), ("exclude", "qc", "roles"))
    version = top["version"]
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(
            f"version: {version!r} is not supported; this cohortflow reads version {VERSION}"
        )
    if top.get("roles") is not None:
        roles = parse_roles(top["roles"], source)
    elif shipped:
        raise ProtocolError("roles: the shipped protocol file must define the series roles")
    else:
        roles = _shipped_roles()
    shared = _rules(top.get("exclude"), "exclude", roles)
    try:
        shared_qc = parse_policy(top.get("qc"), None, "qc")  # alone, it names its own errors
    except PolicyError as exc:
        raise ProtocolError(str(exc)) from None
    protocols = _names(top["protocols"], "protocols", "protocol")
    if not protocols:
        raise ProtocolError("protocols: define at least one protocol")
    parsed = {
        name: _protocol(name, p, shared, top.get("qc"), roles) for name, p in protocols.items()
    }
    rules = {rule for p in parsed.values() for rule, _ in p.include}
    _check_roles(
        top.get("qc"),
        rules | set(roles.names()),
        "qc",
        "no protocol has an include rule called it, and it is not a series role",
    )
    return ProtocolSet(
        VERSION, source, MappingProxyType(parsed), "", roles, tuple(shared.items()), shared_qc
    )


def _check_roles(section: object, rules: Iterable[str], where: str, problem: str) -> None:
    """Each role a QC section names must be an include rule (a typo would check nothing)."""
    known = list(rules)
    roles = section.get("roles") if isinstance(section, dict) else None
    for role in roles or {}:
        if role not in known:
            raise ProtocolError(f"{where}.roles.{role}: {problem}{did_you_mean(str(role), known)}")


def _protocol(
    name: str, data: object, shared: dict[str, Rule], shared_qc: object, roles: RoleSet
) -> Protocol:
    where = f"protocols.{name}"
    fields = _fields(data, where, ("title", "study", "series"), ("qc",))
    title = fields["title"]
    if not isinstance(title, str) or not title.strip():
        raise ProtocolError(f"{where}.title: give a short human title")
    study = _fields(fields["study"], f"{where}.study", ("modality",), ("description",))
    modality = study["modality"]
    if not isinstance(modality, str) or not _MODALITY.fullmatch(modality):
        raise ProtocolError(
            f"{where}.study.modality: {modality!r} is not a DICOM modality (e.g. MR)"
        )
    patterns = study.get("description") or []
    if not isinstance(patterns, list):
        raise ProtocolError(f'{where}.study.description: give a list of patterns, e.g. ["*MS*"]')
    for i, pattern in enumerate(patterns):
        # a backslash would turn the C-FIND key into several values; LO holds 64 characters
        if not isinstance(pattern, str) or not pattern or "\\" in pattern or len(pattern) > 64:
            raise ProtocolError(
                f"{where}.study.description[{i}]: {pattern!r} is not a C-FIND pattern; give "
                "text of at most 64 characters without backslash (* and ? are wildcards)"
            )
    series = _fields(fields["series"], f"{where}.series", ("include", "require"), ("exclude",))
    include = _rules(series["include"], f"{where}.series.include", roles)
    if not include:
        raise ProtocolError(f"{where}.series.include: define at least one include rule")
    exclude = shared | _rules(series.get("exclude"), f"{where}.series.exclude", roles)
    for clash in include.keys() & exclude.keys():
        raise ProtocolError(f"{where}.series.include.{clash}: also an exclusion's name; rename one")
    require = series["require"]
    if not isinstance(require, list) or not require:
        raise ProtocolError(
            f"{where}.series.require: list the include rules a study must have, e.g. [t1_3d]"
        )
    for rule in require:
        if not isinstance(rule, str) or rule not in include:
            raise ProtocolError(
                f"{where}.series.require: {rule!r} is not one of the include rules "
                f"({', '.join(include)}); name one of them or add an include rule"
            )
    own_qc = fields.get("qc")
    try:
        policy = parse_policy(shared_qc, own_qc, f"{where}.qc")
    except PolicyError as exc:
        raise ProtocolError(str(exc)) from None
    _check_roles(
        own_qc, include, f"{where}.qc", f"not one of the include rules ({', '.join(include)})"
    )
    return Protocol(
        name,
        title.strip(),
        StudyQuery(modality, tuple(patterns)),
        tuple(include.items()),
        tuple(exclude.items()),
        tuple(dict.fromkeys(require)),
        policy,
        roles,
    )
