"""The drift gauges (recupdate_drift) follow status.lastDrift: set, partly unmeasured, and forgotten."""

from recupdate_operator import metrics
from recupdate_operator.api import DriftStatus


def _values(policy: str) -> dict[str, float | None]:
    return {
        m: metrics.value("recupdate_drift", {"namespace": "ns", "policy": policy, "measure": m})
        for m in ("jaccard", "floor_jaccard", "excess", "contexts")
    }


def test_drift_gauges_follow_the_status() -> None:
    metrics.set_drift("ns", "p", DriftStatus(release_id="r1", jaccard=0.4, floor_jaccard=0.7, excess=0.3, contexts=12))
    assert _values("p") == {"jaccard": 0.4, "floor_jaccard": 0.7, "excess": 0.3, "contexts": 12.0}
    # too little support: no Jaccard, no excess; the gauges say nothing rather than a stale figure
    metrics.set_drift("ns", "p", DriftStatus(release_id="r2", contexts=0))
    assert _values("p") == {"jaccard": None, "floor_jaccard": None, "excess": None, "contexts": 0.0}
    metrics.set_drift("ns", "p", DriftStatus(release_id="r3", jaccard=0.5, floor_jaccard=0.5, excess=0.0, contexts=3))
    metrics.forget_policy("ns", "p")
    assert set(_values("p").values()) == {None}
