"""The LlamaIndex retriever inside a real RetrieverQueryEngine, against the live app.

The LLM is llama-index's own MockLLM: without max_tokens it answers with its prompt, so the
response shows exactly which fresh passages the engine put in front of the model.
"""

from __future__ import annotations

import uuid

from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine

from headwater.client import Client
from headwater.integrations.llamaindex import HeadwaterRetriever


def test_retriever_query_engine_answers_from_the_fresh_index(live_app):
    tenant = "li" + uuid.uuid4().hex[:8]
    with Client(live_app.url, api_token="admin", tenant=tenant) as hw:
        hw.publish("lighthouse.md", "The lighthouse lamp is serviced every March by the crew.",
                   metadata={"site": "cape"})  # fmt: skip
        hw.publish("boat.md", "The rescue boat is launched from the slipway at low tide.")
        retriever = HeadwaterRetriever(live_app.url, api_token="admin", tenant=tenant,
                                       similarity_top_k=1, token=str(hw.token))  # fmt: skip
        engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())
        response = engine.query("When is the lighthouse lamp serviced?")
        [node] = response.source_nodes
        assert node.node.metadata["doc_id"] == "lighthouse.md"
        assert node.node.metadata["site"] == "cape" and node.score > 0
        assert "serviced every March" in str(response)  # the passage reached the prompt

        # An edit is what the next query sees: the token of the write makes it wait.
        retriever.token = str(hw.publish("lighthouse.md", "The lamp is now serviced in May."))
        response = engine.query("When is the lighthouse lamp serviced?")
        assert "serviced in May" in str(response) and "March" not in str(response)
        retriever.close()
