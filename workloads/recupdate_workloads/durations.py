"""Duration strings such as '90d', '6h', '30m', '2w' (the units the policy spec uses)."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_seconds(text: str) -> int:
    m = _RE.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit s, m, h, d or w (e.g. 90d)")
    return int(m.group(1)) * _UNITS[m.group(2)]
