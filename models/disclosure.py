"""Disclosure control of the counts the de-identified layer shows: the cell-key method.

A count of fewer than ``min_cell`` patients is suppressed, but that alone is bypassed by
subtraction: ``--age 50..`` gives 9 patients, ``--age 51..`` 8, so one patient is 50. Every
count a reader without the steward role sees is therefore perturbed, as the Australian Bureau
of Statistics' TableBuilder does (the cell-key method: Fraser and Wooton, "A proposed method
for confidentialising tabular output to protect against differencing", UNECE work session on
statistical data confidentiality, 2005; Thompson, Broadfoot and Elazar, "Methodology for the
automatic confidentialisation of statistical outputs from remote servers at the Australian
Bureau of Statistics", 2013), with the noise of i2b2's obfuscated counts (a normal distribution
of standard deviation 1.33 clipped at +/-3; Murphy et al., JAMIA 2011):

- every patient, study and series carries a record key: a keyed hash (the project key) of its
  identity, 31 bits, stored in ``cohort_series`` (never shown);
- a count's cell key is the sum of the record keys of the patients (studies, series) it counts;
  the noise added is drawn from the p-table below by a keyed hash of the cell key. The same set
  of patients always gets the same noise, so asking again, or asking the same thing another way,
  never averages it away; two sets that differ by one patient get independent noise;
- the perturbed count is rounded to a multiple of ``round_to``; a count of fewer than
  ``min_cell`` patients is not shown at all (suppressed, as before), a shown count is never
  below ``min_cell`` (the first multiple of ``round_to`` from it) and an empty cell stays 0.

The guarantee (README "Disclosure control"): two answers that differ by one patient differ by
1 plus the difference of two independent noises of -3..+3, rounded, so no single pair of
answers tells a suppressed count with certainty. What it does not stop is averaging over many
distinct pairs of queries built around the same patient; every de-identified query is audited
with its user, filters and answer for that reason.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

#: what the project key's derived secret for disclosure control is called (ProjectKey.derived)
DISCLOSURE = "disclosure-control"
#: record keys are this many bits (the sum of a million stays far inside a 64-bit integer)
RECORD_KEY_BITS = 31
#: the p-table: noise -3..+3 with the probabilities of a normal distribution of standard
#: deviation 1.33 (i2b2's) on those integers, clipped at +/-3 and renormalised
NOISE_SIGMA = 1.33
NOISE_MAX = 3


def _p_table() -> tuple[tuple[int, float], ...]:
    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / (NOISE_SIGMA * math.sqrt(2))))

    weights = [(d, cdf(d + 0.5) - cdf(d - 0.5)) for d in range(-NOISE_MAX, NOISE_MAX + 1)]
    total = sum(w for _, w in weights)
    running, table = 0.0, []
    for d, w in weights:
        running += w / total
        table.append((d, running))
    return tuple(table)


P_TABLE = _p_table()


@dataclass(frozen=True)
class Disclosure:
    """How counts are protected: ``secret`` keys the noise (derived from the project key, so
    that nobody without it can compute a cell's noise), ``min_cell`` the smallest count shown,
    ``round_to`` the base shown counts are rounded to."""

    secret: bytes
    min_cell: int
    round_to: int = 5

    def noise(self, cell_key: int, kind: str) -> int:
        """The noise of the cell whose record keys sum to ``cell_key``, for counts of ``kind``
        (patients, studies, series, instances)."""
        digest = hmac.new(self.secret, f"{kind}\0{cell_key}".encode(), hashlib.sha256).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for d, upper in P_TABLE:
            if u < upper:
                return d
        return NOISE_MAX

    def shown(self, true: int, cell_key: int, kind: str) -> int:
        """The count shown for ``true``: 0 for none (an empty cell stays empty, as in the
        ABS's method), else at least ``min_cell`` (smaller ones are suppressed by the caller)."""
        if true <= 0:
            return 0
        perturbed = true + self.noise(cell_key, kind)
        base = max(1, self.round_to)
        rounded = int(base * math.floor(perturbed / base + 0.5))
        return max(base * math.ceil(self.min_cell / base), rounded)


def record_key(secret: bytes, kind: str, identity: str) -> int:
    """A record's key: a keyed hash of what it is (``patient``, ``study`` or ``series`` and its
    identity), RECORD_KEY_BITS bits."""
    digest = hmac.new(secret, f"record\0{kind}\0{identity}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % (1 << RECORD_KEY_BITS)


def cell_key(sum_of_record_keys: int | None) -> int:
    """The cell key of a count: the sum of its record keys, modulo 2^RECORD_KEY_BITS."""
    return int(sum_of_record_keys or 0) % (1 << RECORD_KEY_BITS)
