"""Issue 15, defect 11: no policy touches another's data. Two policies could share one store schema
(default/demo and team-a/demo; my-policy and my.policy; names alike in their first 63 characters), and
nothing recorded which policy owned a schema. Now the default schema keeps lossy names apart (api.schema_name)
and every schema records its owner (migration 002): the operator, local mode and the jobs refuse a schema
another policy owns, before they write anything.

The operator-level scenarios (kopf on the emulated API) are in tests/operator/test_hardening_owner_opk.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from psycopg import sql

from recupdate_operator import local_driver as local
from recupdate_operator.api import PolicySpec, RunKind, schema_name
from recupdate_operator.backends.base import PolicyRef
from recupdate_operator.planner import Event, LaunchRun, Policy, RegistryView, SchemaOwner, owner_conflict, plan
from recupdate_operator.registry import Registry, StoreSettings
from recupdate_workloads.jobs import run as jobs
from recupdate_workloads.jobs.config import RunConfig
from recupdate_workloads.store.db import Store, check_schema, connect, migrate, open_store, schema_for
from recupdate_workloads.store.owner import Owner, SchemaOwnedError, claim_owner, read_owner

NOW = datetime(2030, 1, 8, 0, 30, tzinfo=UTC)
# A Kubernetes object name (DNS-1123 subdomain) and namespace (DNS-1123 label).
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
K8S_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_fresh = itertools.count()


def old_schema_name(policy_name: str) -> str:
    """api.schema_name before this fix, for the backward-compatibility check."""
    name = re.sub(r"[^a-z0-9_]", "_", policy_name.lower())
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = "p_" + name
    return name[:63]


@pytest.fixture
def registry(pg_dsn: str) -> Iterator[Registry]:
    r = Registry(None, StoreSettings(default_dsn=pg_dsn))
    yield r
    r.close()


@pytest.fixture
def fresh_schema(pg_dsn: str) -> Iterator[str]:
    """A schema name nobody has created; dropped afterwards."""
    name = f"own_{os.getpid()}_{next(_fresh)}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def ref_for(namespace: str, name: str, uid: str, schema: str = "") -> PolicyRef:
    return PolicyRef(name, namespace, uid, PolicySpec.model_validate({"store": {"schema": schema}}))


def tables_of(conn: psycopg.Connection, schema: str) -> set[str]:
    return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}


# ---------------------------------------------------------------------------------------------------------
# The default schema name: the four reproductions, pure


def test_two_namespaces_share_a_default_schema_and_the_second_is_refused() -> None:
    # Bullet 1: default/demo and team-a/demo map to one schema (the namespace stays out of the name, so no
    # existing policy's data moves); the owner record refuses the second, naming the first.
    assert schema_name("demo") == "demo"
    owner = SchemaOwner("default", "demo", "uid-1")
    message = owner_conflict(owner, "team-a", "demo", schema_name("demo"))
    assert message is not None and "default/demo (uid uid-1)" in message and "spec.store.schema" in message
    assert owner_conflict(owner, "default", "demo", "demo") is None  # the owner itself


def test_names_that_sanitise_alike_get_distinct_schemas() -> None:
    # Bullet 2: my-policy and my.policy both mapped to my_policy.
    assert schema_name("my-policy") == "my_policy"  # plain names keep their schema (no data moves)
    dotted = schema_name("my.policy")
    assert dotted != "my_policy" and re.fullmatch(r"_my_policy_[0-9a-f]{8}", dotted)
    assert schema_name("9lives") != schema_name("p-9lives")  # the old 'p_' prefix collided too


def test_names_alike_in_their_first_63_characters_get_distinct_schemas() -> None:
    # Bullet 3: truncation to 63 characters made these one schema.
    prefix = "recommender-" + "x" * 51  # 63 characters
    a, b = prefix + "-movies", prefix + "-books"
    assert old_schema_name(a) == old_schema_name(b)
    sa, sb = schema_name(a), schema_name(b)
    assert sa != sb and len(sa) <= 63 and len(sb) <= 63
    check_schema(sa), check_schema(sb)


@pytest.mark.parametrize(
    "name", ["demo", "my-policy", "movies", "a", "x" * 63, "local-demo", "recs-v2", "a--b", "my.policy", "9lives"]
)
def test_operator_and_workloads_agree_on_the_default_schema(name: str) -> None:
    assert schema_name(name) == schema_for(name)


# ---------------------------------------------------------------------------------------------------------
# The planner: a policy that does not own its schema gets SpecValid=False and nothing else


def _plan(owner: SchemaOwner | None, namespace: str = "team-a", uid: str = "uid-2") -> Any:
    policy = Policy("demo", namespace, PolicySpec(), 1, {}, NOW, uid=uid)
    return plan(policy, None, [], RegistryView(owner=owner), NOW)


def test_the_planner_refuses_another_policys_schema() -> None:
    p = _plan(SchemaOwner("default", "demo", "uid-1"))
    assert [a for a in p.actions if not isinstance(a, Event)] == []  # no launch, record, promotion or roll
    (cond,) = [c for c in p.status.conditions if c.type == "SpecValid"]
    assert (cond.status, cond.reason) == ("False", "SchemaInUse")
    assert "default/demo (uid uid-1)" in cond.message
    assert [(e.type, e.reason) for e in p.actions] == [("Warning", "SchemaInUse")]
    # Reported once: the same refusal on the next reconcile posts no second Event.
    policy = Policy("demo", "team-a", PolicySpec(), 1, {}, NOW, uid="uid-2")
    again = plan(policy, p.status, [], RegistryView(owner=SchemaOwner("default", "demo", "uid-1")), NOW)
    assert again.actions == ()


def test_the_owner_plans_and_its_runs_carry_its_identity() -> None:
    p = _plan(SchemaOwner("team-a", "demo", "uid-2"))
    (launch,) = p.of(LaunchRun)
    assert launch.kind == RunKind.FINETUNE
    assert (launch.config["namespace"], launch.config["policy"], launch.config["policyUid"]) == (
        "team-a",
        "demo",
        "uid-2",
    )
    cfg = RunConfig.parse(json.dumps(launch.config))
    assert cfg.owner == Owner("team-a", "demo", "uid-2")


def test_an_adopted_schema_is_announced() -> None:
    p = _plan(SchemaOwner("team-a", "demo", "uid-2", previous_uid="uid-0"))
    assert next(e.reason for e in p.actions if isinstance(e, Event)) == "SchemaAdopted"
    assert p.of(LaunchRun)


# ---------------------------------------------------------------------------------------------------------
# The store: the owner record, claimed atomically


def test_the_operator_claims_before_any_job_and_the_table_is_the_migrations(
    registry: Registry, pg_dsn: str, fresh_schema: str
) -> None:
    owner = registry.claim(ref_for("default", "demo", "uid-1", fresh_schema))
    assert owner == SchemaOwner("default", "demo", "uid-1")
    with connect(pg_dsn) as conn:
        assert tables_of(conn, fresh_schema) == {"policy_owner"}
        # The operator's table and migration 002's are one definition; a job's migration then runs over it.
        other = fresh_schema[:55] + "_m"
        try:
            migrate(conn, other)
            cols = (
                "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = 'policy_owner' ORDER BY ordinal_position"
            )
            assert conn.execute(cols, (fresh_schema,)).fetchall() == conn.execute(cols, (other,)).fetchall()
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other)))
        assert "002_policy_owner.sql" in migrate(conn, fresh_schema)
        assert read_owner(conn, fresh_schema) == Owner("default", "demo", "uid-1")


def test_a_second_claimant_gets_the_first_and_the_view_reads_nothing(registry: Registry, store: Store) -> None:
    first = ref_for("default", "demo", "uid-1", store.schema)
    second = ref_for("team-a", "demo", "uid-2", store.schema)
    assert registry.claim(first) == SchemaOwner("default", "demo", "uid-1")
    store.conn.execute(
        sql.SQL("INSERT INTO {} (run_id, kind, status) VALUES ('r', 'refresh', 'running')").format(
            sql.Identifier(store.schema, "runs")
        )
    )
    view = registry.read(second)
    assert view.owner == SchemaOwner("default", "demo", "uid-1") and view.runs == () and view.error is None
    assert registry.read(first).runs[0].run_id == "r"
    assert read_owner(store.conn, store.schema) == Owner("default", "demo", "uid-1")  # unchanged


def test_a_recreated_policy_adopts_its_schema(registry: Registry, store: Store) -> None:
    registry.claim(ref_for("default", "demo", "uid-1", store.schema))
    adopted = registry.claim(ref_for("default", "demo", "uid-2", store.schema))
    assert adopted == SchemaOwner("default", "demo", "uid-2", previous_uid="uid-1")
    assert read_owner(store.conn, store.schema) == Owner("default", "demo", "uid-2")
    assert registry.claim(ref_for("default", "demo", "uid-2", store.schema)).previous_uid == ""  # once


def test_concurrent_claims_have_one_winner(pg_dsn: str, fresh_schema: str) -> None:
    import threading

    results: list[SchemaOwner] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        r = Registry(None, StoreSettings(default_dsn=pg_dsn))
        try:
            barrier.wait()
            results.append(r.claim(ref_for(f"ns{i}", "demo", f"u{i}", fresh_schema)))
        finally:
            r.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len(set(results)) == 1  # every claimant read back the same single owner


# ---------------------------------------------------------------------------------------------------------
# Jobs: the run config's policy must own the schema, checked before anything is written


def _job_config(schema: str, namespace: str, name: str, uid: str, tmp_path: Path) -> str:
    return json.dumps(
        {
            "runId": f"{name}-rf-203001080000",
            "kind": "refresh",
            "policy": name,
            "namespace": namespace,
            "policyUid": uid,
            "storeSchema": schema,
            "window": {"start": "2029-12-09T00:00:00Z", "end": "2030-01-08T00:00:00Z"},
            "executor": "inline",
            "storage": str(tmp_path / "artifacts"),
        }
    )


def _contents(conn: psycopg.Connection, schema: str) -> tuple[int, int, int]:
    def n(table: str) -> int:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
        return int(row[0]) if row else 0

    return n("runs"), n("snapshots"), n("releases")


def test_a_job_for_another_policy_writes_nothing(
    store: Store, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Bullet 4: one policy's refresh could publish over another's. The job refuses and writes nothing.
    claim_owner(store.conn, store.schema, Owner("default", "demo", "uid-1"))
    monkeypatch.setenv("RECUPDATE_STORE_DSN", pg_dsn)
    with caplog.at_level(logging.ERROR, logger="recupdate.jobs"):
        rc = jobs.main("refresh", ["--config", _job_config(store.schema, "team-a", "demo", "uid-2", tmp_path)])
    assert rc == 1
    assert "belongs to policy default/demo (uid uid-1)" in caplog.text and "nothing written" in caplog.text
    assert _contents(store.conn, store.schema) == (0, 0, 0)
    assert read_owner(store.conn, store.schema) == Owner("default", "demo", "uid-1")


def test_a_job_of_an_earlier_incarnation_is_refused(
    store: Store, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    claim_owner(store.conn, store.schema, Owner("default", "demo", "uid-2"))  # re-created: uid-2 owns it
    monkeypatch.setenv("RECUPDATE_STORE_DSN", pg_dsn)
    with caplog.at_level(logging.ERROR, logger="recupdate.jobs"):
        rc = jobs.main("refresh", ["--config", _job_config(store.schema, "default", "demo", "uid-1", tmp_path)])
    assert rc == 1 and "earlier incarnation" in caplog.text
    assert _contents(store.conn, store.schema) == (0, 0, 0)


def test_a_refused_job_does_not_even_migrate(
    registry: Registry, pg_dsn: str, fresh_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.claim(ref_for("default", "demo", "uid-1", fresh_schema))  # the operator's claim: no tables yet
    monkeypatch.setenv("RECUPDATE_STORE_DSN", pg_dsn)
    assert jobs.main("refresh", ["--config", _job_config(fresh_schema, "team-a", "demo", "u2", tmp_path)]) == 1
    with connect(pg_dsn) as conn:
        assert tables_of(conn, fresh_schema) == {"policy_owner"}


def test_a_job_claims_an_unowned_schema_and_its_owner_runs(
    pg_dsn: str, fresh_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECUPDATE_STORE_DSN", pg_dsn)
    # It fails later (no active release to refresh), but as the schema's owner: its run row is written.
    assert jobs.main("refresh", ["--config", _job_config(fresh_schema, "default", "demo", "uid-1", tmp_path)]) == 1
    with connect(pg_dsn) as conn:
        assert read_owner(conn, fresh_schema) == Owner("default", "demo", "uid-1")
        assert _contents(conn, fresh_schema)[0] == 1


# ---------------------------------------------------------------------------------------------------------
# Local mode: claims before it writes the catalogue


def test_local_mode_refuses_another_policys_schema(
    store: Store, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    claim_owner(store.conn, store.schema, Owner("default", "movies", "uid-1"))
    doc = {
        "apiVersion": "recupdate.io/v1alpha1",
        "kind": "RecommenderUpdatePolicy",
        "metadata": {"name": "demo"},
        "spec": {"store": {"schema": store.schema}},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("RECUPDATE_STORE_DSN", pg_dsn)
    parser = argparse.ArgumentParser()
    local.configure(parser)
    args = parser.parse_args(["-f", str(path), "--workdir", str(tmp_path / "w"), "--no-status-line"])
    assert local.run(args) == 2
    assert "belongs to policy default/movies" in capsys.readouterr().err
    with store.tx() as c:
        assert c.execute("SELECT count(*) FROM clusters").fetchone() == (0,)  # no catalogue written
    assert _contents(store.conn, store.schema) == (0, 0, 0)


def test_open_store_adopts_only_for_the_same_policy(store: Store, pg_dsn: str) -> None:
    claim_owner(store.conn, store.schema, Owner("default", "demo", "k8s-uid"))
    s = open_store(store.schema, pg_dsn, owner=Owner("default", "demo", "local"), adopt=True)
    s.close()
    assert read_owner(store.conn, store.schema) == Owner("default", "demo", "local")
    with pytest.raises(SchemaOwnedError, match="belongs to policy default/demo"):
        open_store(store.schema, pg_dsn, owner=Owner("default", "other", "local"), adopt=True)


# ---------------------------------------------------------------------------------------------------------
# Properties: distinct (namespace, name) pairs never share a schema unnoticed

# DNS-1123 labels from a small alphabet (so that near-misses are common), some long enough to be truncated.
_ALNUM = "ab19z"


def _label(max_middle: int) -> st.SearchStrategy[str]:
    end = st.sampled_from(_ALNUM)
    return st.one_of(end, st.builds(lambda a, m, b: a + m + b, end, st.text(_ALNUM + "-", max_size=max_middle), end))


label = _label(12)
names = st.lists(st.one_of(label, _label(61)), min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 253)
namespaces = label


@st.composite
def near_pairs(draw: st.DrawFn) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two (namespace, name) pairs, most of them built to collide under the old mapping."""
    ns, name = draw(namespaces), draw(names)
    how = draw(st.sampled_from(["namespace", "dot-dash", "prefix", "p-prefix", "independent"]))
    if how == "namespace":
        other = (draw(namespaces), name)
    elif how == "dot-dash":  # swap one '-' for '.' or back
        seps = [i for i, ch in enumerate(name) if ch in "-."]
        assume(seps)
        i = draw(st.sampled_from(seps))
        other = (ns, name[:i] + ("." if name[i] == "-" else "-") + name[i + 1 :])
    elif how == "prefix":  # alike in the first 63 characters
        base = (name + "-" + "x" * 63)[:63]
        name, other = base + draw(label), (ns, base + draw(label))
    elif how == "p-prefix":  # '9x' became 'p_9x', as did 'p-9x'
        name = "9" + name
        other = (ns, "p-" + name)
    else:
        other = (draw(namespaces), draw(names))
    event(f"pair: {how}")
    return (ns, name), other


def _valid(pair: tuple[str, str]) -> bool:
    ns, name = pair
    return bool(K8S_LABEL.match(ns) and len(ns) <= 63 and K8S_NAME.match(name) and len(name) <= 253)


def test_property_distinct_policies_never_share_a_schema_unnoticed() -> None:
    counts = Counter[str]()

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(near_pairs())
    def check(pair: tuple[tuple[str, str], tuple[str, str]]) -> None:
        a, b = pair
        assume(_valid(a) and _valid(b) and a != b)
        counts["inputs"] += 1
        sa, sb = schema_name(a[1]), schema_name(b[1])
        for name, s in ((a[1], sa), (b[1], sb)):
            assert check_schema(s) == s and s == schema_for(name)  # a valid identifier; both sides agree
            if re.fullmatch(r"[a-z][a-z0-9-]{0,62}", name):
                assert s == old_schema_name(name)  # plain names keep their schema: no data moves
        if old_schema_name(a[1]) == old_schema_name(b[1]):
            counts["collided before"] += 1
        if sa != sb:
            counts["distinct schemas"] += 1
            return
        # One schema: only a namespace apart (the hash keeps names apart), and the owner refuses the second.
        counts["same schema, second refused"] += 1
        assert a[1] == b[1]
        message = owner_conflict(SchemaOwner(a[0], a[1], "uid-a"), b[0], b[1], sb)
        assert message is not None and f"{a[0]}/{a[1]}" in message

    check()
    print(f"\ngenerated inputs: {dict(counts)}")
    assert counts["distinct schemas"] > 100 and counts["same schema, second refused"] > 50
    assert counts["collided before"] > counts["same schema, second refused"]  # the fix separated the rest


def test_property_real_store_claims(pg_dsn: str) -> None:
    counts = Counter[str]()

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(near_pairs())
    def check(pair: tuple[tuple[str, str], tuple[str, str]]) -> None:
        a, b = pair
        assume(_valid(a) and _valid(b) and a != b)
        schemas = {schema_name(a[1]), schema_name(b[1])}
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            existing = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}
            assume(not (schemas & existing))  # never touch another test's schema
            registry = Registry(None, StoreSettings(default_dsn=pg_dsn))
            try:
                ra, rb = ref_for(a[0], a[1], "uid-a"), ref_for(b[0], b[1], "uid-b")
                assert registry.read(ra).owner == SchemaOwner(a[0], a[1], "uid-a")
                view_b = registry.read(rb)
                if len(schemas) == 1:
                    counts["same schema, refused"] += 1
                    assert view_b.owner == SchemaOwner(a[0], a[1], "uid-a")
                    assert owner_conflict(view_b.owner, b[0], b[1], rb.schema) is not None
                else:
                    counts["distinct schemas"] += 1
                    assert view_b.owner == SchemaOwner(b[0], b[1], "uid-b")
            finally:
                registry.close()
                for s in schemas:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))

    check()
    print(f"\nreal-store claims: {dict(counts)}")
    assert sum(counts.values()) >= 5


def test_local_mode_wiring_claims_once_for_itself_and_its_jobs(store: Store, pg_dsn: str) -> None:
    # What `recupdate local` does, without Ray: open_store claims for the local policy, every registry read
    # finds it the owner, and the jobs it launches (their run config) are accepted by the owner check.
    s = open_store(store.schema, pg_dsn, owner=Owner("default", "lm", local.LOCAL_UID), adopt=True)
    s.close()
    registry = Registry(None, StoreSettings(default_dsn=pg_dsn))
    try:
        ref = ref_for("default", "lm", local.LOCAL_UID, store.schema)
        view = registry.read(ref)
        assert view.owner == SchemaOwner("default", "lm", local.LOCAL_UID) and view.error is None
        policy = Policy("lm", "default", ref.spec, 1, {}, NOW, uid=local.LOCAL_UID)
        (launch,) = plan(policy, None, [], view, NOW).of(LaunchRun)
        cfg = RunConfig.parse(json.dumps(launch.config))
        assert cfg.store_schema == store.schema and cfg.owner is not None
        s = open_store(cfg.store_schema, pg_dsn, owner=cfg.owner)  # the job's check passes
        s.close()
    finally:
        registry.close()
