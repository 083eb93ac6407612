"""The operator's registry access (SQL through psycopg against 001_registry.sql) on the embedded PostgreSQL."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from recupdate_operator.api import PolicySpec, RunKind, RunResult, SecretKeyRef
from recupdate_operator.backends import PolicyRef
from recupdate_operator.events import SECRETS, redact
from recupdate_operator.planner import RecordRun
from recupdate_operator.registry import Registry, StoreError, StoreSettings
from recupdate_workloads.store.db import Store  # tests only

T0 = datetime(2030, 1, 8, tzinfo=UTC)


@pytest.fixture
def ref(store: Store) -> PolicyRef:
    return PolicyRef("recs", "ml", "u", PolicySpec.model_validate({"store": {"schema": store.schema}}))


@pytest.fixture
def registry(pg_dsn: str) -> Any:
    r = Registry(None, StoreSettings(default_dsn=pg_dsn))
    yield r
    r.close()


def q(store: Store, query: str, *args: Any) -> list[tuple[Any, ...]]:
    cur = store.conn.execute(sql.SQL(query).format(s=sql.Identifier(store.schema)), args)
    return cur.fetchall() if cur.description else []


def add_release(store: Store, rid: str, state: str = "candidate", *, window_end: int | None = None, **kw: Any) -> None:
    snap = None
    if window_end is not None:
        snap = q(
            store,
            "INSERT INTO {s}.snapshots (window_start, window_end, scoring, top_r, min_support, state)"
            " VALUES (0, %s, 'frequency', 1, 5, 'current') RETURNING snapshot_id",
            window_end,
        )[0][0]
    q(
        store,
        "INSERT INTO {s}.runs (run_id, kind, status) VALUES (%s, 'refresh', 'succeeded') ON CONFLICT DO NOTHING",
        rid,
    )
    q(
        store,
        "INSERT INTO {s}.releases (release_id, base_model, adapter_uri, snapshot_id, table_version, gates, state,"
        " created_at, run_id) VALUES (%s, 'b', %s, %s, 3, %s, %s, %s, %s)",
        rid,
        f"s3://a/{rid}",
        snap,
        json.dumps(kw.get("gates", {"passed": True})),
        state,
        kw.get("created", T0),
        rid,
    )


def states(store: Store) -> dict[str, str]:
    return dict(q(store, "SELECT release_id, state FROM {s}.releases"))  # type: ignore[arg-type]


def test_a_schema_no_job_created_yet_reads_empty(registry: Registry) -> None:
    ref = PolicyRef("fresh", "ml", "u", PolicySpec.model_validate({"store": {"schema": "opk_never_created"}}))
    view = registry.read(ref)
    assert (view.error, view.runs, view.releases) == (None, (), ())
    registry.record_run(ref, RecordRun("x", RunKind.FINETUNE, RunResult.FAILED, "JobFailed"), T0)  # no table: no-op


def test_read_runs_releases_and_evidence_time(registry: Registry, ref: PolicyRef, store: Store) -> None:
    end = int((T0 - timedelta(hours=2)).timestamp())
    add_release(store, "r1", "active", window_end=end)
    add_release(store, "r2", created=T0 + timedelta(hours=1))
    q(store, "INSERT INTO {s}.runs (run_id, kind, status) VALUES ('r3', 'finetune', 'running')")
    q(store, "INSERT INTO {s}.runs (run_id, kind, status) VALUES ('boot', 'bootstrap', 'succeeded')")
    view = registry.read(ref)
    assert view.error is None
    assert [r.release_id for r in view.releases] == ["r1", "r2"]
    active = view.active()
    assert active is not None and active.release_id == "r1"
    assert active.evidence_at == T0 - timedelta(hours=2)
    assert (active.adapter_uri, active.table_version, active.run_id) == ("s3://a/r1", "3", "r1")
    assert view.release("r2").evidence_at is None  # type: ignore[union-attr]
    assert {r.run_id: (r.kind, r.status, r.release_id) for r in view.runs} == {
        "r1": (RunKind.REFRESH, "succeeded", "r1"),
        "r2": (RunKind.REFRESH, "succeeded", "r2"),
        "r3": (RunKind.FINETUNE, "running", None),
    }  # bootstrap runs (local mode) are not the planner's


def test_record_run_only_if_not_final(registry: Registry, ref: PolicyRef, store: Store) -> None:
    q(store, "INSERT INTO {s}.runs (run_id, kind, status) VALUES ('a', 'finetune', 'running')")
    q(store, "INSERT INTO {s}.runs (run_id, kind, status) VALUES ('b', 'finetune', 'succeeded')")
    fail = RecordRun("a", RunKind.FINETUNE, RunResult.FAILED, "JobFailed", "OOM")
    registry.record_run(ref, fail, T0)
    registry.record_run(ref, RecordRun("b", RunKind.FINETUNE, RunResult.FAILED, "JobDeleted"), T0)
    registry.record_run(ref, RecordRun("c", RunKind.REFRESH, RunResult.FAILED, "JobFailed"), T0)
    rows = {r[0]: r[1:] for r in q(store, "SELECT run_id, status, error, finished_at FROM {s}.runs")}
    assert rows["a"] == ("failed", "JobFailed: OOM", T0)
    assert rows["b"][0] == "succeeded"  # the workload's own record wins
    assert rows["c"][:2] == ("failed", "JobFailed")
    registry.record_run(ref, RecordRun("a", RunKind.FINETUNE, RunResult.SUCCEEDED, "Completed"), T0)
    assert q(store, "SELECT status FROM {s}.runs WHERE run_id = 'a'") == [("failed",)]


def test_activate_is_one_transaction(registry: Registry, ref: PolicyRef, store: Store) -> None:
    add_release(store, "r1", "active")
    add_release(store, "r2")
    add_release(store, "bad", "rejected")
    registry.activate(ref, "r2", T0)
    assert states(store) == {"r1": "retired", "r2": "active", "bad": "rejected"}
    assert q(store, "SELECT activated_at FROM {s}.releases WHERE release_id = 'r2'") == [(T0,)]
    registry.activate(ref, "r2", T0 + timedelta(days=1))  # idempotent
    assert q(store, "SELECT activated_at FROM {s}.releases WHERE release_id = 'r2'") == [(T0,)]
    with pytest.raises(StoreError, match="rejected") as exc:
        registry.activate(ref, "bad", T0)
    assert not exc.value.transient
    with pytest.raises(StoreError, match="does not exist"):
        registry.activate(ref, "nope", T0)
    assert states(store) == {"r1": "retired", "r2": "active", "bad": "rejected"}  # nothing half done
    registry.activate(ref, "r1", T0)  # a rollback target
    assert states(store) == {"r1": "active", "r2": "retired", "bad": "rejected"}


def test_reject_and_prune(registry: Registry, ref: PolicyRef, store: Store) -> None:
    add_release(store, "r1", "active")
    add_release(store, "c1")
    add_release(store, "old", "retired")
    registry.reject(ref, "c1", ["recall (0.01 vs 0.015)"])
    registry.reject(ref, "r1", ["never"])  # only candidates can be rejected
    assert states(store) == {"r1": "active", "c1": "rejected", "old": "retired"}
    assert q(store, "SELECT gates->'reasons' FROM {s}.releases WHERE release_id = 'c1'") == [
        (["recall (0.01 vs 0.015)"],)
    ]
    registry.prune(ref, ["c1", "old", "r1"])  # the active one is never pruned
    assert states(store) == {"r1": "active"}


def test_store_errors_never_carry_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password = "Pa55word-Never-Shown"
    for dsn in (
        f"postgresql://recupdate:{password}@[::1/recsys",  # libpq quotes this DSN whole in its error
        f"host=127.0.0.1 port=1 user=recupdate password={password} dbname=x connect_timeout=2",
    ):
        r = Registry(None, StoreSettings(default_dsn=dsn))
        ref = PolicyRef("recs", "ml", "u", PolicySpec())
        view = r.read(ref)
        assert view.error and password not in view.error
        with pytest.raises(StoreError) as exc:
            r.activate(ref, "x", T0)
        assert password not in str(exc.value) and exc.value.__cause__ is None and exc.value.__suppress_context__
    assert password not in caplog.text


def test_redact() -> None:
    SECRETS.add("postgresql://u:TopSecret99@h/db")
    assert redact("failed: postgresql://u:TopSecret99@h/db") == "failed: ***"
    assert redact("see TopSecret99 here") == "see *** here"
    assert redact("dsn=postgresql://x:other-pass@host/db") == "dsn=postgresql://x:***@host/db"
    assert redact("host=h password='a b c' user=u") == "host=h password=*** user=u"
    assert redact("host=h password=plain user=u") == "host=h password=*** user=u"
    assert redact("no secrets here") == "no secrets here"


def test_secret_reader(pg_dsn: str) -> None:
    class FakeCore:
        calls = 0

        def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
            import base64

            FakeCore.calls += 1
            if name == "missing":
                from kubernetes.client.exceptions import ApiException

                raise ApiException(status=404, reason="Not Found")
            return type("S", (), {"data": {"dsn": base64.b64encode(pg_dsn.encode()).decode()}})()

    from recupdate_operator.registry import SecretReader

    reader = SecretReader(None)
    reader.api = FakeCore()
    assert reader.get("ml", SecretKeyRef(name="store")) == pg_dsn
    assert reader.get("ml", SecretKeyRef(name="store")) == pg_dsn
    assert FakeCore.calls == 1  # cached
    with pytest.raises(StoreError, match="not found"):
        reader.get("ml", SecretKeyRef(name="missing"))
    with pytest.raises(StoreError, match="no key 'url'"):
        reader.get("ml", SecretKeyRef(name="store", key="url"))
    r = Registry(reader, StoreSettings())
    ref = PolicyRef("recs", "ml", "u", PolicySpec.model_validate({"store": {"secretRef": {"name": "store"}}}))
    assert r.dsn(ref) == pg_dsn
    with pytest.raises(StoreError, match="no store configured"):
        r.dsn(PolicyRef("recs", "ml", "u", PolicySpec()))
    with psycopg.connect(pg_dsn):
        pass
