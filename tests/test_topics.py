"""`topics.poll`: the workaround for a rebalance that kafka-python loses (pure logic; the real
broker exercises it in every consumer-group test)."""

from __future__ import annotations

from types import SimpleNamespace

from kafka.structs import MemberState

from headwater.runtime import clients


class FakeConsumer:
    def __init__(self, state: str, need_rejoin: bool, subscribed: bool = True) -> None:
        self.rejoins = 0
        self.polls: list[tuple[int, int | None]] = []
        self._subscribed = subscribed

        def request_rejoin() -> None:
            self.rejoins += 1

        self._coordinator = SimpleNamespace(
            state=state, group_id="g", need_rejoin=lambda: need_rejoin,
            request_rejoin=request_rejoin,
        )  # fmt: skip

    def subscription(self) -> set[str]:
        return {"t"} if self._subscribed else set()

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict:
        self.polls.append((timeout_ms, max_records))
        return {}


def test_a_finished_but_unapplied_rebalance_is_rejoined():
    c = FakeConsumer(MemberState.REBALANCING, need_rejoin=False)
    assert clients.poll(c, timeout_ms=50, max_records=7) == {}
    assert c.rejoins == 1 and c.polls == [(50, 7)]


def test_healthy_or_joining_consumers_are_left_alone():
    for c in (
        FakeConsumer(MemberState.STABLE, need_rejoin=False),
        FakeConsumer(MemberState.REBALANCING, need_rejoin=True),  # a join in flight
        FakeConsumer(MemberState.UNJOINED, need_rejoin=True),
        FakeConsumer(MemberState.REBALANCING, need_rejoin=False, subscribed=False),
    ):
        clients.poll(c, timeout_ms=0)
        assert c.rejoins == 0 and c.polls == [(0, None)]
