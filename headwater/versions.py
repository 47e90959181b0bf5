"""Which of two events of one document wins: the order the index applies document events in.

A document's events share one partition (the key is `tenant/doc_id`), so their offsets are a
total order consistent with the order the broker acknowledged them: an acknowledged write is
never overridden by one acknowledged earlier, whatever the producers' clocks say. A source that
carries its own version (a corpus `seq`, an upstream commit sequence) keeps it as a guard
against its own stale re-sends: when both events carry one, a lower source version is stale.
The indexer (`index.writer`) and the truth checker (`index.verify`) both decide with
`supersedes`, so they fold a document's events identically.
"""

from __future__ import annotations

from dataclasses import dataclass

INT64_MAX = 2**63 - 1  # Milvus stores versions and offsets as INT64


@dataclass(frozen=True)
class Stamp:
    """Where one document event stands: its source version (if any) and its log position."""

    version: int | None
    partition: int
    offset: int

    @property
    def reported(self) -> int:
        """The version readers see (hits, change events): the source's, else the offset."""
        return self.offset if self.version is None else self.version


def supersedes(new: Stamp, current: Stamp | None) -> bool:
    """Whether the event at `new` replaces the document state written by the one at `current`.

    Later in the log wins, except that a lower source version is stale when both carry one. An
    equal stamp is the same record delivered again: it does not supersede. Events of different
    partitions (the topic was repartitioned, which breaks every key's order) apply in arrival
    order.
    """
    if current is None:
        return True
    if new.version is not None and current.version is not None and new.version < current.version:
        return False
    if new.partition != current.partition:
        return True
    return new.offset > current.offset
