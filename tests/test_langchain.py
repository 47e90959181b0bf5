"""LangChain's own standard test suites (langchain-tests) against the live app."""

from __future__ import annotations

import uuid

import pytest
from langchain_tests.integration_tests import (
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)

from headwater.client import Client
from headwater.integrations.langchain import HeadwaterRetriever, HeadwaterVectorStore

PAGES = {
    "tools/tar.md": "Extract a tar archive with tar -xf archive.tar into the current folder.",
    "tools/zip.md": "Create a zip archive of a folder with zip -r archive.zip folder.",
    "tools/gzip.md": "Compress a file with gzip file.txt; it becomes file.txt.gz.",
    "tools/ls.md": "List the files of a folder, hidden ones too, with ls -la.",
}
LIVE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _live(live_app):
    """Tenant of the retriever suite, with its pages indexed (read through a token)."""
    tenant = "lc" + uuid.uuid4().hex[:8]
    with Client(live_app.url, api_token="admin", tenant=tenant) as hw:
        for doc_id, text in PAGES.items():
            hw.publish(doc_id, text, metadata={"kind": "tldr"})
        LIVE.update(url=live_app.url, tenant=tenant, token=str(hw.token))
    yield
    LIVE.clear()


class TestHeadwaterRetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[HeadwaterRetriever]:
        return HeadwaterRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"url": LIVE["url"], "api_token": "admin", "tenant": LIVE["tenant"],
                "token": LIVE["token"]}  # fmt: skip

    @property
    def retriever_query_example(self) -> str:
        return "how do I extract an archive?"


class TestHeadwaterVectorStore(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self):
        """An empty store: a tenant of its own (tenants are open on the live app)."""
        store = HeadwaterVectorStore(LIVE["url"], api_token="admin",
                                     tenant="vs" + uuid.uuid4().hex[:8])  # fmt: skip
        try:
            yield store
        finally:
            store.close()


def test_retriever_documents_carry_the_index_fields(live_app):
    docs = HeadwaterRetriever(**TestHeadwaterRetriever().retriever_constructor_params).invoke(
        "extract a tar archive", k=2
    )
    top = docs[0]
    assert top.id == "tools/tar.md" and top.page_content == PAGES["tools/tar.md"]
    assert {"doc_id", "version", "chunk_id", "section", "score", "kind"} <= set(top.metadata)
    assert top.metadata["doc_id"] == "tools/tar.md" and top.metadata["kind"] == "tldr"


def test_vector_store_reads_its_own_writes_and_stays_in_its_tenant(live_app):
    tenant = "vs" + uuid.uuid4().hex[:8]
    store = HeadwaterVectorStore(live_app.url, api_token="admin", tenant=tenant)
    try:
        # No wait in the test: the store's searches wait for its own writes (the token).
        for i in range(3):
            store.add_texts([f"Version {i} of the release notes mentions feature {i}."],
                            ids=["notes.md"])  # fmt: skip
            [doc] = store.similarity_search("release notes feature", k=1)
            assert doc.page_content.startswith(f"Version {i} ")
    finally:
        store.close()
    other = HeadwaterVectorStore(live_app.url, api_token="tok-b")
    try:
        assert all(d.id != "notes.md" for d in other.similarity_search("release notes", k=5))
    finally:
        other.close()
