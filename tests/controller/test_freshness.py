"""The controller reconciles from the freshest policy it knows: the watch's copy, its own last status write
while the watch lags behind it, or a fresh read when events raced with that write (their order is unknown)."""

from __future__ import annotations

from typing import Any

from recupdate_operator.controller import Controller

KEY = ("default", "recs")


def body(rv: int, approve: str | None = None) -> dict[str, Any]:
    ann = {"recupdate.io/approve": approve} if approve else {}
    return {
        "apiVersion": "recupdate.io/v1alpha1",
        "kind": "RecommenderUpdatePolicy",
        "metadata": {
            "name": "recs",
            "namespace": "default",
            "resourceVersion": str(rv),
            "generation": 1,
            "annotations": ann,
        },
        "spec": {},
        "status": {"observedGeneration": rv},
    }


class FakeApi:
    def __init__(self, controller: Controller, server: dict[str, Any]) -> None:
        self.controller, self.server, self.gets = controller, server, 0
        self.during_patch: list[dict[str, Any]] = []

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        self.gets += 1
        return dict(self.server)

    def patch_namespaced_custom_object_status(self, *args: Any, **kw: Any) -> dict[str, Any]:
        rv = int(self.server["metadata"]["resourceVersion"]) + 1
        self.server = {
            **self.server,
            "metadata": {**self.server["metadata"], "resourceVersion": str(rv)},
            "status": args[5]["status"],
        }
        for event in self.during_patch:  # the watch delivers these before our thread sees the answer
            self.controller.on_policy("MODIFIED", event)
        return dict(self.server)


def setup() -> tuple[Controller, FakeApi]:
    c = Controller(api_client=object())
    api = FakeApi(c, body(1))
    c.status.custom = api
    c.on_policy(None, body(1))
    return c, api


def test_own_write_is_used_until_the_watch_catches_up() -> None:
    c, api = setup()
    entry = c._entries[KEY]
    c.status.write(KEY, entry, body(1), {"observedGeneration": 7})
    assert c.status.current_body(KEY, entry)["metadata"]["resourceVersion"] == "2"  # our write, not the stale watch
    c.on_policy("MODIFIED", api.server)  # the watch shows our write
    assert c.status.current_body(KEY, entry)["metadata"]["resourceVersion"] == "2"
    assert entry.written is None and api.gets == 0


def test_an_event_after_our_write_forces_a_fresh_read() -> None:
    c, api = setup()
    entry = c._entries[KEY]
    c.status.write(KEY, entry, body(1), {"observedGeneration": 7})
    api.server = body(3, approve="r1")  # someone annotates; the watch skips our own event (kopf batches)
    c.on_policy("MODIFIED", api.server)
    fresh = c.status.current_body(KEY, entry)
    assert api.gets == 1 and fresh["metadata"]["annotations"] == {"recupdate.io/approve": "r1"}


def test_events_racing_with_the_write_force_a_fresh_read() -> None:
    c, api = setup()
    entry = c._entries[KEY]
    # While our patch is in flight, the watch delivers a newer change (an approval) before the answer returns.
    api.during_patch = [body(5, approve="r1")]
    api.server = body(10)  # our write becomes 11: is event 5 before or after it? Unknown: read afresh
    c.status.write(KEY, entry, body(1), {"observedGeneration": 7})
    api.server = body(12, approve="r1")
    fresh = c.status.current_body(KEY, entry)
    assert api.gets == 1 and fresh["metadata"]["annotations"] == {"recupdate.io/approve": "r1"}
