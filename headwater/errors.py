"""Every error headwater raises on purpose: one root, four kinds, one class per concept.

The kinds tell a caller what to do, so the HTTP gateway, the CLI and the consumer runtime map
errors by class: `InvalidInput` is the caller's to fix (422), `Forbidden` is refused (403),
`Unavailable` may succeed later (503; the runtime retries it), `Timeout` ran out of time (504).
"""

from __future__ import annotations


class HeadwaterError(Exception):
    """Root of every error headwater raises on purpose; the message is one line for a user."""


# -- the kinds ---------------------------------------------------------------------------------


class InvalidInput(HeadwaterError, ValueError):
    """The request or event itself is wrong; retrying it unchanged cannot succeed."""


class Forbidden(HeadwaterError):
    """The caller may not do this (unknown tenant, another tenant's data)."""


class Unavailable(HeadwaterError):
    """A service headwater needs did not answer or refused for now; retrying may succeed."""


class Timeout(HeadwaterError):
    """A bounded wait ran out before the awaited state was reached."""


class Busy(Unavailable):
    """A bound on concurrent work is reached; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# -- events and documents ----------------------------------------------------------------------


class EventError(InvalidInput):
    """An event that cannot be accepted; the message is the reason kept in the dead-letter topic."""


class NoChange(HeadwaterError):
    """A record that asks for no document change (a Debezium tombstone naming no document)."""


class InvalidDocumentError(InvalidInput):
    """A document event breaks the schema: doc_id, metadata, op/text shape, version."""


class DocumentTooLargeError(InvalidDocumentError):
    """The text is larger than `settings.max_text_bytes`."""


class UnknownTenantError(Forbidden, InvalidInput):
    """The tenant is not in `settings.tenants`."""


class GatewayUnavailable(Unavailable):
    """headwater's HTTP API could not be reached or failed on its side (the client's view)."""


class DeliveryError(Unavailable):
    """The broker was unreachable or did not acknowledge in time (the event may be lost)."""


class CorpusError(InvalidInput):
    """A corpus that cannot be read; the message names the file and line."""


# -- Kafka and the consumer runtime ------------------------------------------------------------


class KafkaUnavailable(Unavailable):
    """The Kafka cluster did not answer (or a topic is missing); the runtime retries."""


class ProduceFailed(HeadwaterError):
    """A record produced while handling an input record was refused for good by the broker."""


class Cancelled(HeadwaterError):
    """Work given up because its loop is stopping; it is done again later, by someone."""


class StopConsumer(HeadwaterError):
    """An error policy decided that the consumer loop must stop."""


# -- the index ---------------------------------------------------------------------------------


class StoreError(Unavailable):
    """Milvus refused or could not be reached; the write can be retried."""


class ChunkerError(InvalidInput):
    """Chunking parameters that cannot work, or a document the chunker refuses."""


class ChunkBudgetExceeded(ChunkerError):
    """Chunking one document took longer than its `budget_s`; the message is one line."""


class TooManyChunks(ChunkerError):
    """A document makes more chunks than `settings.max_doc_chunks` allows."""


class EmbedderError(HeadwaterError):
    """The embedding model could not be loaded or failed to embed."""


class SearchError(InvalidInput):
    """A search that cannot be run as asked (bad argument, bad freshness token)."""


class FreshnessTimeout(Timeout):
    """The indexer has not applied the freshness token within the bounded wait."""


class TokenBeyondLog(SearchError):
    """A freshness token names offsets the documents topic has not reached: it can never apply."""


# -- queries and answers -----------------------------------------------------------------------


class QueryError(Unavailable):
    """A query that could not be asked or answered; the message is one line for the user."""


class QueryTimeout(Timeout):
    """No answer event arrived in time (is an answerer running?)."""


class QueryAbandoned(HeadwaterError):
    """The asker of a query closed its stream: the rest of the answer is not generated."""


class GenerationError(HeadwaterError):
    """A generation could not run (adapter missing, model failure)."""


class AdapterMismatch(InvalidInput):
    """An adapter version's records on the topic are missing or do not match its manifest."""


# -- models and retraining ---------------------------------------------------------------------


class ModelError(HeadwaterError):
    """A base model cannot be found, converted or loaded."""


class TrainerError(HeadwaterError):
    """A retraining problem worth a one-line message (bad input, busy, nothing to do)."""


class ExampleError(TrainerError, InvalidInput):
    """An example that cannot be accepted; the message says which and why."""


class RegistryError(TrainerError, InvalidInput):
    """A registry operation that cannot be done (unknown version, nothing to roll back)."""


class RunBusy(TrainerError, Busy):
    """Another training run holds the run lock."""


class NothingToTrain(TrainerError):
    """No new examples or document text since the current adapter."""


# -- the local stack ---------------------------------------------------------------------------


class StackError(HeadwaterError):
    """A local service could not be set up, started or stopped; the message says why."""


class InsecureService(InvalidInput):
    """A service would listen beyond loopback without authentication (`--insecure` allows it)."""


class BenchError(HeadwaterError):
    """A benchmark could not run (missing corpus, a stack that did not come up)."""


# -- what a client may be told -----------------------------------------------------------------

_SERVICES: tuple[tuple[type[HeadwaterError], str], ...] = (
    (StoreError, "the index (Milvus) is unavailable"),
    (DeliveryError, "the document log (Kafka) did not acknowledge the write"),
    (KafkaUnavailable, "the event log (Kafka) is unavailable"),
    (QueryError, "the query could not be asked or answered"),
    (GenerationError, "the answer could not be generated"),
    (EmbedderError, "the embedder failed"),
)


def public_message(exc: BaseException) -> str:
    """The one line a client may see: the fault of its own request in full, a service's failure
    by kind only (addresses and Milvus' or Kafka's messages stay in the server log)."""
    if isinstance(exc, InvalidInput | Forbidden | Timeout | Busy):
        return " ".join(str(exc).split())[:1000] or type(exc).__name__
    for cls, what in _SERVICES:
        if isinstance(exc, cls):
            return f"{what}; try again later (details in the server log)"
    if isinstance(exc, Unavailable):
        return "a service headwater needs is unavailable; try again later"
    return "internal error (details in the server log)"
