"""Applied offsets, lag and freshness tokens against the real broker.

The indexer is stood in for by a plain KafkaConsumer in the indexer group that commits offsets,
which is exactly the signal the indexer gives once its Milvus writes succeeded.
"""

from __future__ import annotations

from kafka import OffsetAndMetadata, TopicPartition

from headwater.progress import Progress, applied_offsets, consumer_lag, wait_for_token
from headwater.runtime import clients
from headwater.settings import Settings
from headwater.tokens import FreshnessToken
from producers.publisher import DocumentPublisher


def commit(settings: Settings, offsets: dict[int, int]) -> None:
    """Commit `{partition: next offset}` for the indexer group, as the indexer would."""
    consumer = clients.consumer(settings, group_id=settings.indexer_group)
    try:
        parts = [TopicPartition(settings.documents_topic, p) for p in offsets]
        consumer.assign(parts)
        consumer.commit(
            {
                TopicPartition(settings.documents_topic, p): OffsetAndMetadata(o, "", -1)
                for p, o in offsets.items()
            }
        )
    finally:
        consumer.close()


def test_wait_for_token_is_true_only_after_the_indexer_commits_past_it(settings: Settings) -> None:
    with DocumentPublisher(settings) as pub:
        token = pub.publish_many(
            [pub.build("upsert", f"d{i}.md", text=f"text {i}") for i in range(12)]
        )
    assert len(token) >= 2  # 12 keys over 3 partitions
    assert not wait_for_token(settings, token, timeout=0.3)
    assert applied_offsets(settings) == {}

    with Progress(settings) as progress:
        lag = progress.consumer_lag()
        assert sum(lag.values()) == 12 and not progress.caught_up()
        # Committing exactly the token's offset leaves that record unapplied.
        commit(settings, dict(token))
        assert progress.applied_offsets() == dict(token)
        assert not progress.wait_for_token(token, timeout=0.2)
        # Only one partition past it: still not all applied.
        first = next(iter(token.items()))
        commit(settings, {first[0]: first[1] + 1})
        assert not progress.wait_for_token(token, timeout=0.2)
        assert progress.is_applied(FreshnessToken.of(*first))
        commit(settings, {p: o + 1 for p, o in token.items()})
        assert progress.wait_for_token(str(token), timeout=5)
        assert progress.caught_up()
    assert consumer_lag(settings) == {p: 0 for p in range(settings.partitions)}


def test_empty_token_needs_no_wait_and_other_groups_are_separate(settings: Settings) -> None:
    assert wait_for_token(settings, FreshnessToken(), timeout=0)
    assert wait_for_token(settings, "", timeout=0)
    with DocumentPublisher(settings) as pub:
        token = pub.upsert("only.md", "text")
    (partition, offset), *_ = token.items()
    commit(settings.model_copy(update={"indexer_group": "someone-else"}), {partition: offset + 1})
    with Progress(settings) as progress:
        assert progress.applied_offsets() == {}
        assert progress.applied_offsets("someone-else") == {partition: offset + 1}
        assert not progress.wait_for_token(token, timeout=0.2)
        assert progress.consumer_lag("someone-else")[partition] == 0
        assert progress.consumer_lag()[partition] == 1
