"""The consumer runtime every loop of headwater runs on.

- `clients`: the kafka-python clients and every workaround they need (the only place one is built);
- `member`: a consumer-group member's polls, commits and rebalance bookkeeping;
- `batches.BatchLoop` (micro-batches: indexer, standing matcher) and `pool.PoolLoop` (records
  handled concurrently: query consumer) on top of it;
- `outbox.Outbox`: produced records awaited before their input offsets are committed;
- `deadletter`: the error policies (dead-letter, skip, stop);
- `retry`: backoff with jitter as a wrapper;
- `reader`: `Tail` and `read_to_end`, reading without a group and surviving outages;
- `shutdown`: SIGTERM/SIGINT to a stop event.
"""
