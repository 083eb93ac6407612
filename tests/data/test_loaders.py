from pathlib import Path

import numpy as np
import pytest

from recupdate_workloads.data.loaders import load, load_movielens, load_table
from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream, transition_structure

MOVIELENS = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-latest-small"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_table_loader_counts_and_skips_bad_rows(tmp_path: Path) -> None:
    items = _write(tmp_path / "items.csv", "item,cluster\na,drama\nb,comedy\nc,drama\n")
    clusters = _write(tmp_path / "clusters.csv", "cluster,keywords\ndrama,tears;family\ncomedy,laughs\n")
    inter = _write(
        tmp_path / "events.csv",
        "uid,iid,when,score\n"
        "u1,a,1600000000,4.5\n"  # ok
        "u1,b,2020-09-13T12:26:40Z,3\n"  # ok: ISO timestamp
        "u2,,1600000001,4\n"  # missing item
        "u2,c,yesterday,4\n"  # bad timestamp
        "u2,zzz,1600000002,4\n"  # unknown item
        "u3,a,1600000003,-1\n"  # negative weight
        "u3,a,1600000004,lots\n"  # bad weight
        ",a,1600000005,4\n"  # missing user
        "u3,c,1600000006,5\n",  # ok
    )
    ds = load_table(inter, items, clusters, {"user": "uid", "item": "iid", "ts": "when", "weight": "score"})
    r = ds.report
    assert r.rows_read == 9 and r.rows_kept == 3
    assert dict(r.skipped) == {
        "missing_field": 2,
        "bad_timestamp": 1,
        "unknown_item": 1,
        "negative_weight": 1,
        "bad_weight": 1,
    }
    assert sum(r.skipped.values()) + r.rows_kept == r.rows_read
    log = ds.log
    assert [log.catalogue.name(c) for c in log.item_cluster[log.item]] == ["drama", "comedy", "drama"]
    assert log.ts.tolist() == [1600000000, 1600000000, 1600000006]
    assert ds.catalogue.clusters[ds.catalogue.lookup("drama")].keywords == ("tears", "family")  # type: ignore[index]
    assert "skipped" in r.summary()


def test_load_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown data source"):
        load("ftp:somewhere")


def test_synthetic_is_deterministic_and_sized() -> None:
    spec = SyntheticSpec(n_interactions=20_000, seed=3)
    a, b = SyntheticStream(spec).generate(), SyntheticStream(spec).generate()
    assert len(a) == 20_000
    assert np.array_equal(a.item, b.item) and np.array_equal(a.ts, b.ts)
    other = SyntheticStream(SyntheticSpec(n_interactions=20_000, seed=4)).generate()
    assert not np.array_equal(a.item, other.item)
    assert spec.start <= a.ts.min() and a.ts.max() < spec.end
    chunks = list(SyntheticStream(spec).chunks(users_per_chunk=100))
    assert sum(len(c) for c in chunks) == 20_000
    # chunks hold whole users
    assert len(set.intersection(*(set(c.user.tolist()) for c in chunks[:2]))) == 0


def test_synthetic_drift_is_the_configured_amount() -> None:
    """The fraction of contexts whose top successor changes between periods tracks `drift`."""
    changed = {}
    for drift in (0.0, 0.5):
        p = transition_structure(SyntheticSpec(drift=drift, n_trends=0, n_late_clusters=0, seed=1))
        top = p.argmax(axis=-1)
        changed[drift] = float((top[1:] != top[:-1]).mean())
    assert changed[0.0] == 0.0
    assert 0.3 < changed[0.5] < 0.6


def test_synthetic_late_clusters_appear() -> None:
    spec = SyntheticSpec(n_late_clusters=2, seed=5)
    p = transition_structure(spec)
    reachable = p.sum(axis=(1, 2)) > 0  # [period, cluster]
    assert (~reachable[0]).sum() == 2
    assert reachable[-1].sum() >= spec.n_clusters - 2


@pytest.mark.skipif(not MOVIELENS.exists(), reason="../shared/data/ml-latest-small is absent")
def test_movielens_clusters() -> None:
    ds = load_movielens(MOVIELENS)
    assert ds.report.rows_kept == 100_836 and not ds.report.skipped
    assert len(ds.catalogue) == 173  # the two most specific genres (docs/architecture.md)
    assert len(load_movielens(MOVIELENS, clusters="genre").catalogue) == 20
