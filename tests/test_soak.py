"""The reliability scenarios of tests/test_reliability.py, long: `make soak` (pytest -m soak).

Bounded: the whole soak run stays within ~20 minutes on a 2-core machine. Each scenario prints a
`RELIABILITY` line with the faults it injected (run with -s or -rP to see them).
"""

from __future__ import annotations

import pytest

from tests.test_reliability import (
    SOAK,
    broker_restarts,
    fuzzed_events,
    group_rebalances,
    kill_nine_during_replay,
    milvus_outages,
    replayed_streams,
    report_faults,
)

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_soak_kill_nine_of_the_indexer(settings, tmp_path, monkeypatch, capsys):
    faults = kill_nine_during_replay(settings, tmp_path, monkeypatch, capsys, SOAK)
    report_faults("soak kill -9 indexer", faults)
    assert faults.counts["kill -9"] == SOAK.kills


def test_soak_fuzzed_events(settings, embedder):
    faults = fuzzed_events(settings, embedder, SOAK)
    report_faults("soak fuzzed events", faults)
    assert faults.counts["valid events"] + faults.counts["invalid events"] >= 10_000


def test_soak_broker_restarts(stack_settings, settings, embedder, tmp_path):
    faults = broker_restarts(stack_settings, settings, embedder, tmp_path, SOAK)
    report_faults("soak broker restart", faults)
    assert faults.counts["broker kill -9"] + faults.counts["broker stop"] == SOAK.broker_outages


def test_soak_milvus_outages(stack_settings, settings, embedder, tmp_path):
    faults = milvus_outages(stack_settings, settings, embedder, tmp_path, SOAK)
    report_faults("soak milvus outage", faults)
    assert faults.counts["milvus kill -9"] + faults.counts["milvus stop"] == SOAK.milvus_outages


def test_soak_replayed_streams(settings, embedder):
    faults = replayed_streams(settings, embedder, SOAK)
    report_faults("soak duplicate/reorder/replay", faults)


def test_soak_group_rebalances(settings, embedder, tmp_path):
    faults = group_rebalances(settings, embedder, tmp_path, SOAK)
    report_faults("soak group rebalances", faults)
