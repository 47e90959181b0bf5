"""Adapters for LLM application frameworks, over the HTTP API (`headwater.client`).

`headwater.integrations.langchain` needs `pip install headwater[langchain]`;
`headwater.integrations.llamaindex` needs `pip install headwater[llamaindex]`.
"""
