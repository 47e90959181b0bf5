"""LangChain over headwater: a retriever of the fresh index and a vector store that writes events.

    from headwater.integrations.langchain import HeadwaterRetriever, HeadwaterVectorStore

`HeadwaterRetriever` searches (`GET /v1/search`) and returns one Document per chunk, its
metadata the document's own plus `doc_id`, `version`, `chunk_id`, `section` and `score`;
`token=` (a freshness token) makes it wait for writes it must see. `HeadwaterVectorStore` is a
LangChain VectorStore whose `add_documents`/`delete` publish document events (ids are doc ids)
and whose searches wait for the store's own writes, so a LangChain application writes through
the event stream and reads its writes. The server embeds (the index's embedder): the store
needs no Embeddings, and `embeddings` is the server's, over `/v1/embeddings`. Needs
`pip install headwater[langchain]`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import PrivateAttr

from headwater.client import DEFAULT_URL, AsyncClient, Client
from headwater.events import Hit, IndexedDocument
from headwater.tokens import FreshnessToken

MAX_K = 100


def hit_document(hit: Hit) -> Document:
    """A retrieved chunk as a LangChain Document (id: its document's id)."""
    fields = {"doc_id": hit.doc_id, "version": hit.version, "chunk_id": hit.chunk_id,
              "section": hit.section, "score": hit.score}  # fmt: skip
    return Document(id=hit.doc_id, page_content=hit.text, metadata={**hit.metadata, **fields})


class HeadwaterRetriever(BaseRetriever):
    """Chunks of the fresh index that answer a query, for LangChain chains and agents."""

    url: str = DEFAULT_URL
    api_token: str | None = None
    tenant: str | None = None
    k: int = 4
    token: str | None = None
    """Freshness token: searches wait (bounded) until the index has applied it."""

    _client: Client | None = PrivateAttr(default=None)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        if self._client is None:
            self._client = Client(self.url, api_token=self.api_token, tenant=self.tenant)
        k, token = kwargs.get("k", self.k), kwargs.get("token", self.token)
        return [hit_document(h) for h in self._client.search(query, k=k, token=token or "")]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k, token = kwargs.get("k", self.k), kwargs.get("token", self.token)
        # One client per call: an httpx.AsyncClient belongs to the event loop that made it.
        async with AsyncClient(self.url, api_token=self.api_token, tenant=self.tenant) as hw:
            return [hit_document(h) for h in await hw.search(query, k=k, token=token or "")]


class HeadwaterEmbeddings(Embeddings):
    """The index's own embedder, over the gateway's OpenAI-compatible `/v1/embeddings`."""

    def __init__(self, url: str = DEFAULT_URL, *, api_token: str | None = None) -> None:
        self.url, self.api_token = url, api_token

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        with Client(self.url, api_token=self.api_token) as hw:
            return hw.embed(texts) if texts else []

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class HeadwaterVectorStore(VectorStore):
    """A VectorStore whose writes are document events and whose reads see its own writes."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_token: str | None = None,
        tenant: str | None = None,
        embedding: Embeddings | None = None,
    ) -> None:
        self.url, self.api_token, self.tenant = url, api_token, tenant
        self._embedding = embedding
        self.client = Client(url, api_token=api_token, tenant=tenant)
        self.token = FreshnessToken()  # every write of this store, sync or async

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding or HeadwaterEmbeddings(self.url, api_token=self.api_token)

    def _async(self) -> AsyncClient:
        return AsyncClient(self.url, api_token=self.api_token, tenant=self.tenant)

    # -- writes --------------------------------------------------------------------------------
    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Publish one upsert per text (the id is the doc id; new ones get a uuid)."""
        out = []
        for text, metadata, doc_id in _rows(texts, metadatas, ids):
            self.token |= self.client.publish(doc_id, text, metadata=metadata)
            out.append(doc_id)
        return out

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        out = []
        async with self._async() as hw:
            for text, metadata, doc_id in _rows(texts, metadatas, ids):
                self.token |= await hw.publish(doc_id, text, metadata=metadata)
                out.append(doc_id)
        return out

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Publish a delete of each id (deleting an unknown id is no error)."""
        if ids is None:
            raise ValueError("give the ids to delete (a whole-store delete is not supported)")
        for doc_id in ids:
            self.token |= self.client.delete(doc_id)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if ids is None:
            raise ValueError("give the ids to delete (a whole-store delete is not supported)")
        async with self._async() as hw:
            for doc_id in ids:
                self.token |= await hw.delete(doc_id)
        return True

    # -- reads (each waits for this store's writes) --------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [_stored(d) for d in self.client.documents(ids, token=str(self.token))]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        async with self._async() as hw:
            return [_stored(d) for d in await hw.documents(ids, token=str(self.token))]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, **kwargs)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        hits = self.client.search(query, k=min(3 * k, MAX_K), token=str(self.token))
        return _best_per_document(hits, k)

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score(query, k, **kwargs)]

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        async with self._async() as hw:
            hits = await hw.search(query, k=min(3 * k, MAX_K), token=str(self.token))
        return _best_per_document(hits, k)

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> HeadwaterVectorStore:
        """A store at `url=` (keyword) holding `texts`; `embedding` is ignored (the server's)."""
        store = cls(**kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def close(self) -> None:
        self.client.close()


def _rows(
    texts: Iterable[str], metadatas: list[dict] | None, ids: list[str | None] | None
) -> list[tuple[str, dict, str]]:
    texts = list(texts)
    metadatas = metadatas or [{} for _ in texts]
    ids = ids or [None] * len(texts)
    if not len(texts) == len(metadatas) == len(ids):
        raise ValueError("texts, metadatas and ids must be as many")
    return [(t, m, i or uuid.uuid4().hex) for t, m, i in zip(texts, metadatas, ids, strict=True)]


def _stored(doc: IndexedDocument) -> Document:
    return Document(id=doc.doc_id, page_content=doc.text, metadata=dict(doc.metadata))


def _best_per_document(hits: list[Hit], k: int) -> list[tuple[Document, float]]:
    """The best chunk of each document (a Document per document, as LangChain expects), k."""
    out: list[tuple[Document, float]] = []
    seen: set[str] = set()
    for hit in hits:
        if hit.doc_id not in seen:
            seen.add(hit.doc_id)
            doc = Document(id=hit.doc_id, page_content=hit.text, metadata=dict(hit.metadata))
            out.append((doc, hit.score))
    return out[:k]
