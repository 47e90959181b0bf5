"""The OpenAI-compatible API, driven by the official `openai` package against the live app."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from headwater.client import Client

FACT = "The Aurora ferry to Skerry Island leaves from pier 9 at 07:15 every weekday."
OTHER = "The canteen on the third floor serves soup on Thursdays."


@pytest.fixture(scope="module")
def written(live_app):
    """Tenant a's two documents, indexed; the token of those writes."""
    with Client(live_app.url, api_token="tok-a") as hw:
        hw.publish("ferries/aurora.md", FACT, metadata={"team": "ops"})
        hw.publish("canteen.md", OTHER)
        hw.search("ferry", k=1)  # waits for both writes
        return str(hw.token)


def test_chat_completions_not_streamed(live_app, written):
    ai = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key="tok-a")
    assert [m.id for m in ai.models.list()] == [live_app.model]
    question = [{"role": "user", "content": "When does the Aurora ferry leave for Skerry Island?"}]
    reply = ai.chat.completions.create(
        model=live_app.model, messages=question, max_tokens=5, extra_body={"token": written}
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == live_app.model and reply.created > 0
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    # The tiny test generator never stops on its own: max_tokens is what ends it.
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    citations = reply.model_extra["citations"]
    assert citations[0]["doc_id"] == "ferries/aurora.md" and citations[0]["text"] == FACT
    assert citations[0]["metadata"] == {"team": "ops"}
    assert reply.model_extra["headwater"]["query_id"] == reply.id.removeprefix("chatcmpl-")

    # Earlier turns of the chat reach the generator's prompt.
    history = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Hello there, I have a question about ferries."},
        {"role": "assistant", "content": "Of course, ask away."},
    ]
    longer = ai.chat.completions.create(model=live_app.model, messages=history + question,
                                        max_tokens=5)  # fmt: skip
    assert longer.usage.prompt_tokens > reply.usage.prompt_tokens


def test_chat_completions_streamed(live_app, written):
    ai = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key="tok-a")
    messages = [{"role": "user", "content": "Where does the Aurora ferry leave from?"}]
    chunks = list(
        ai.chat.completions.create(
            model=live_app.model, messages=messages, stream=True, max_tokens=8, temperature=0,
            stream_options={"include_usage": True}, extra_body={"token": written},
        )
    )  # fmt: skip
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    first, last, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert first.model_extra["citations"][0]["doc_id"] == "ferries/aurora.md"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and len(chunks) >= 4
    assert last.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert usage.choices == [] and usage.usage.completion_tokens == 8

    # temperature 0 is greedy: the same answer streamed or not; a high one samples.
    plain = ai.chat.completions.create(model=live_app.model, messages=messages, max_tokens=8)
    assert plain.choices[0].message.content == text
    sampled = [
        ai.chat.completions.create(model=live_app.model, messages=messages, max_tokens=8,
                                   temperature=2.0).choices[0].message.content
        for _ in range(3)
    ]  # fmt: skip
    assert any(s != text for s in sampled)


def test_embeddings_are_the_index_embedder(live_app):
    ai = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key="tok-a")
    texts = ["ferry timetable", "soup on Thursdays"]
    want = live_app.embedder.encode(texts)
    for fmt in ("float", "base64"):  # the SDK asks for base64 unless told otherwise
        kwargs = {"encoding_format": fmt} if fmt == "float" else {}
        got = ai.embeddings.create(model="all-MiniLM-L6-v2", input=texts, **kwargs)
        assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 0
        vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        assert vectors.shape == (2, 384)
        assert np.allclose(vectors, want, atol=1e-5)


def test_tokens_tenants_and_errors(live_app, written):
    b = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key="tok-b")
    messages = [{"role": "user", "content": "When does the Aurora ferry leave?"}]
    reply = b.chat.completions.create(model=live_app.model, messages=messages, max_tokens=2)
    assert all(c["doc_id"] != "ferries/aurora.md" for c in reply.model_extra["citations"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_app.url}/v1", api_key="nope").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        b.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError, match="last message"):
        b.chat.completions.create(model=live_app.model,
                                  messages=[{"role": "assistant", "content": "hi"}])  # fmt: skip


def test_adapter_versions_are_models_and_answer_when_named(live_app, written):
    """Last in this module: it registers adapter versions, new model ids (tenant a's only)."""
    from models.adapters import adapter_path
    from tests.test_generation import tiny_adapters, tiny_tokenizer
    from trainer.registry import Registry

    def register(tenant: str) -> str:
        registry = Registry(live_app.settings, tenant)
        version = registry.begin(None, "test")
        folder = adapter_path(live_app.settings, tenant, version)
        tiny_adapters(folder.parent, tiny_tokenizer(), versions=(version,))  # a random LoRA
        (folder / "headwater.json").write_text("{}")
        registry.finish(version, "accepted", "test")
        return f"{tenant}/{version}"

    name, bs = register("a"), register("b")
    ai = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key="tok-a")
    assert [m.id for m in ai.models.list()] == [live_app.model, name]  # never b's
    messages = [{"role": "user", "content": "When does the Aurora ferry leave?"}]
    base = ai.chat.completions.create(model=live_app.model, messages=messages, max_tokens=8)
    styled = ai.chat.completions.create(model=name, messages=messages, max_tokens=8)
    assert base.model_extra["headwater"]["adapter_version"] is None
    assert styled.model_extra["headwater"]["adapter_version"] == name
    assert styled.model == name
    assert styled.choices[0].message.content != base.choices[0].message.content
    # Named, not promoted: tenant a's current adapter is still none.
    assert live_app.answerer.generator.current("a") is None
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ai.chat.completions.create(model=bs, messages=messages, max_tokens=8)  # b's adapter
