"""What both halves agree on for analysis on live events (docs/analysis.md): the hit depth, and the stable
hash that splits users between the active release and a canary.

Serving routes a /recommend request by ``canary_bucket(user_id)``; the operator scores each arm of a canary
with the same split, computed in SQL by ``CANARY_BUCKET_SQL`` (a test checks that the two agree), so no
request log is needed: a user's arm follows from their id.
"""

from __future__ import annotations

import hashlib

#: HR@K: a scored event is a hit when the user's next novel cluster is in the table's top K for their context.
HIT_K = 5
#: Users fall into this many buckets; a canary of p percent takes the buckets below p * BUCKETS / 100.
BUCKETS = 10_000


def canary_bucket(user_id: str) -> int:
    """The user's bucket, 0..BUCKETS-1: the first 4 bytes of SHA-256 of the id (UTF-8), modulo BUCKETS."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % BUCKETS


def in_canary(user_id: str | None, percent: float) -> bool:
    """Whether a request of this user goes to the canary. No user id: never (the active release answers)."""
    if not user_id or percent <= 0:
        return False
    return canary_bucket(user_id) < percent * BUCKETS / 100


#: The same bucket in PostgreSQL, of a text expression substituted for {user} (mod(), not %: the statement
#: also carries %(name)s parameters).
CANARY_BUCKET_SQL = (
    "mod(('x' || substr(encode(sha256(convert_to({user}, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint, "
    + str(BUCKETS)
    + ")"
)
