"""Durations of the policy spec and the job configs: one grammar for both sides.

A duration is one or more ``<integer><unit>`` parts, with unit s, m, h, d or w, summed: ``90d``, ``6h``,
``1h30m``, ``2w3d``. Whitespace around the whole is ignored; there is no sign and no fraction.
"""

from __future__ import annotations

import re
from datetime import timedelta

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
#: The grammar as a regular expression.
DURATION_PATTERN = r"^([0-9]{1,9}[smhdw])+$"
#: What the CRD admits in a spec field: one part, so that the CRD's CEL rules can compare two durations
#: (Kubernetes CEL has no way to sum the parts of "1h30m"). Every such value is also in the grammar.
SPEC_DURATION_PATTERN = r"^[0-9]{1,9}[smhdw]$"
_PART = re.compile(r"([0-9]+)([smhdw])")
#: The longest duration anywhere (spec fields, CLI flags, deadlines): 10 years. It keeps every time derived
#: from a duration inside datetime's range, so parsing raises ValueError, never OverflowError, later.
MAX_DURATION_SECONDS = 10 * 365 * 86400


def parse_seconds(text: str) -> int:
    """'90d' -> 7776000; '1h30m' -> 5400. ValueError for anything else, and beyond MAX_DURATION_SECONDS."""
    text = text.strip()
    if not text or _PART.sub("", text):
        raise ValueError(f"invalid duration {text!r}: use parts like 30s, 15m, 6h, 90d, 2w (e.g. 1h30m)")
    seconds = sum(int(n) * UNIT_SECONDS[u] for n, u in _PART.findall(text))
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {text!r} is longer than the maximum, {MAX_DURATION_SECONDS // 86400}d (10 years)")
    return seconds


def parse_duration(text: str) -> timedelta:
    """The same grammar as ``parse_seconds``, as a timedelta."""
    return timedelta(seconds=parse_seconds(text))
