"""LlamaIndex over headwater: a retriever of the fresh index for query engines and agents.

    from headwater.integrations.llamaindex import HeadwaterRetriever
    engine = RetrieverQueryEngine.from_args(HeadwaterRetriever(url=..., api_token=...), llm=...)

Each node is one chunk (`TextNode`, id = chunk id) with the document's metadata plus `doc_id`,
`version`, `chunk_id` and `section`, scored as the index scored it; `token=` (a freshness token)
makes retrieval wait for writes it must see. Needs `pip install headwater[llamaindex]`.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import (
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)

from headwater.client import DEFAULT_URL, AsyncClient, Client
from headwater.events import Hit


def hit_node(hit: Hit) -> NodeWithScore:
    """A retrieved chunk as a scored LlamaIndex node, linked to its source document."""
    fields = {"doc_id": hit.doc_id, "version": hit.version, "chunk_id": hit.chunk_id,
              "section": hit.section}  # fmt: skip
    node = TextNode(
        id_=hit.chunk_id,
        text=hit.text,
        metadata={**hit.metadata, **fields},
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=hit.doc_id)},
    )
    return NodeWithScore(node=node, score=hit.score)


class HeadwaterRetriever(BaseRetriever):
    """Chunks of the fresh index that answer a query (`similarity_top_k` of them)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_token: str | None = None,
        tenant: str | None = None,
        similarity_top_k: int = 4,
        token: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.url, self.api_token, self.tenant = url, api_token, tenant
        self.similarity_top_k = similarity_top_k
        self.token = token
        self._client = Client(url, api_token=api_token, tenant=tenant)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self._client.search(query_bundle.query_str, k=self.similarity_top_k,
                                   token=self.token or "")  # fmt: skip
        return [hit_node(h) for h in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        async with AsyncClient(self.url, api_token=self.api_token, tenant=self.tenant) as hw:
            hits = await hw.search(query_bundle.query_str, k=self.similarity_top_k,
                                   token=self.token or "")  # fmt: skip
        return [hit_node(h) for h in hits]

    def close(self) -> None:
        self._client.close()
