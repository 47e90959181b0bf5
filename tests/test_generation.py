"""Streamed generation and adapter hot swap, on a tiny Llama built here (random weights).

The tiny model's tokenizer is word-level, so every generated token is one streamed piece, and
greedy decoding makes each (prompt, adapter) pair produce one exact text to compare against.
The builders here are imported by the answerer and gateway tests too.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from consumers.adapters import AdapterFollower, adapter_location, parse_announcement
from consumers.generation import Generator, extractive_answer
from headwater.errors import GenerationError
from headwater.events import AdapterAnnouncement
from headwater.runtime.clients import producer
from headwater.settings import Settings
from models.adapters import adapter_path, adapters_root

VOCABULARY = (
    "the a river flows water fresh index answer question kafka milvus adapter token stream "
    "event document search chunk tenant news policy vacation days office remote work salary "
    "review employees get per year travel budget report"
)
WORDS = VOCABULARY.split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
# Adapter versions as the registry names them (the follower refuses anything else).
V1, V2 = "v0001-20260101T0000", "v0002-20260101T0000"
MESSAGES = [
    {"role": "system", "content": "answer the question"},
    {"role": "user", "content": "the river flows ?"},
]


# -- builders (shared with other test modules) -------------------------------------------------


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "</s>"]
    symbols = [str(i) for i in range(10)] + list(".,:?![]()")
    vocab = {w: i for i, w in enumerate(specials + WORDS + symbols)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
    )


def tiny_model(tok, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tok))
    # No end-of-sequence: every generation runs to max_new_tokens, so streams are long enough.
    model.generation_config.eos_token_id = None
    return model.eval()


def tiny_adapters(folder: Path, tok, versions=("v1", "v2")) -> dict[str, Path]:
    """Random (non-zero) LoRA adapters for the tiny model, saved with peft."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, version in enumerate(versions):
        base = tiny_model(tok)
        torch.manual_seed(100 + i)
        cfg = LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        get_peft_model(base, cfg).save_pretrained(folder / version)
        out[version] = folder / version
    return out


def tiny_generator(max_new_tokens: int = 16) -> Generator:
    tok = tiny_tokenizer()
    return Generator(tiny_model(tok), tok, max_new_tokens=max_new_tokens)


_EMBEDDER = None


def shared_embedder(settings: Settings):
    """One embedder for the whole session (loading it takes seconds)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        from index.embedder import load_embedder

        _EMBEDDER = load_embedder(settings)
    return _EMBEDDER


class Gate:
    """Holds the model inside its `at`-th forward pass until released (a forward hook)."""

    def __init__(self, model, at: int = 1) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self._calls = 0
        self._at = at
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self._calls += 1
        if self._calls == self._at:
            self.entered.set()
            assert self.released.wait(60), "gate never released"

    def release(self) -> None:
        self.released.set()
        self._handle.remove()


def text_of(generator: Generator, messages=MESSAGES, *adapter) -> str:
    """The whole answer (with the current adapter, or the one given)."""
    return "".join(generator.stream(messages, *adapter))


# -- tests ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run far faster on one thread, above all on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return tiny_adapters(tmp_path_factory.mktemp("adapters"), tiny_tokenizer())


def test_pieces_arrive_before_generation_finishes():
    gen = tiny_generator(max_new_tokens=12)
    reference = text_of(gen)
    gate = Gate(gen.base, at=4)  # three tokens are generated, then the model is held
    stream = gen.stream(MESSAGES)
    first = [next(stream), next(stream)]  # would block forever if pieces waited for the end
    assert gate.entered.wait(30)
    assert stream._thread.is_alive() and not gate.released.is_set()
    gate.release()
    rest = list(stream)
    assert len([p for p in first + rest if p]) >= 6
    assert "".join(first + rest) == reference
    assert not stream._thread.is_alive()


def test_stream_uses_chat_template_and_keeps_control_tokens_as_text():
    gen = tiny_generator()
    ids = gen.encode([{"role": "user", "content": "river <|im_end|> flows"}])["input_ids"][0]
    im_end = gen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Only the template's own <|im_end|> is a control token; the one in the content is text.
    assert ids.tolist().count(im_end) == 1


def test_plain_prompt_without_chat_template():
    gen = tiny_generator()
    gen.tokenizer.chat_template = None
    assert len(text_of(gen).split()) >= 4


def test_adapters_load_under_their_own_names_and_unload_after_swap(adapters):
    gen = tiny_generator()
    base_text = text_of(gen)
    gen.load_adapter("v1", adapters["v1"])
    gen.set_current("v1")
    v1_text = text_of(gen, MESSAGES, "v1")
    assert text_of(gen) == v1_text  # the current adapter is the default
    assert v1_text != base_text
    gen.load_adapter("v2", adapters["v2"])
    assert gen.loaded == ["v1", "v2"]
    gen.set_current("v2")
    assert gen.loaded == ["v2"]  # v1 had no user left
    v2_text = text_of(gen)
    assert v2_text not in (v1_text, base_text)
    assert text_of(gen, MESSAGES, None) == base_text  # adapters disabled for the base model
    gen.set_current(None)
    assert gen.loaded == []
    assert text_of(gen) == base_text
    # Reloading a version after it was unloaded gives the same behaviour as before.
    gen.load_adapter("v1", adapters["v1"])
    assert text_of(gen, MESSAGES, "v1") == v1_text


def test_generation_keeps_its_adapter_across_a_swap(adapters):
    gen = tiny_generator()
    gen.load_adapter("v1", adapters["v1"])
    gen.load_adapter("v2", adapters["v2"])
    ref = {v: text_of(gen, MESSAGES, v) for v in ("v1", "v2")}
    gen.set_current("v1")
    gate = Gate(gen.base)
    running = gen.stream(MESSAGES)  # pinned to v1, held inside its first forward pass
    assert gate.entered.wait(30)
    queued = gen.stream(MESSAGES)  # also pinned to v1, waiting for the model
    swap = threading.Thread(target=gen.set_current, args=("v2",))
    swap.start()  # blocks on the model lock to unload v1: it must wait for both
    later = gen.stream(MESSAGES)
    assert later.adapter == "v2"
    assert gen.loaded == ["v1", "v2"]
    gate.release()
    assert "".join(running) == ref["v1"]
    assert "".join(queued) == ref["v1"]
    assert "".join(later) == ref["v2"]
    swap.join(30)
    assert gen.loaded == ["v2"]


def test_twenty_streams_survive_a_hot_swap(adapters):
    gen = tiny_generator(max_new_tokens=12)
    gen.load_adapter("v1", adapters["v1"])
    gen.load_adapter("v2", adapters["v2"])
    prompts = [[{"role": "user", "content": f"question {i} about the river"}] for i in range(20)]
    ref = {(i, v): text_of(gen, p, v) for i, p in enumerate(prompts) for v in ("v1", "v2")}
    gen.set_current("v1")
    results: dict[int, tuple[str | None, str]] = {}
    errors: list[BaseException] = []

    def consume(i: int, stream) -> None:
        try:
            results[i] = (stream.adapter, "".join(stream))
        except BaseException as exc:
            errors.append(exc)

    gate = Gate(gen.base)
    streams = {i: gen.stream(prompts[i]) for i in range(10)}  # pinned to v1; the first is held
    assert gate.entered.wait(30)
    swapper = threading.Thread(target=gen.set_current, args=("v2",))
    swapper.start()  # the swap happens while ten streams are in flight
    assert _wait(lambda: gen.current == "v2")
    streams |= {i: gen.stream(prompts[i]) for i in range(10, 20)}  # pinned to v2
    threads = [threading.Thread(target=consume, args=(i, s)) for i, s in streams.items()]
    for t in threads:
        t.start()
    gate.release()
    for t in [*threads, swapper]:
        t.join(60)
    assert not errors
    assert len(results) == 20
    for i, (adapter, text) in results.items():
        assert adapter == ("v1" if i < 10 else "v2")
        assert text == ref[(i, adapter)]
    assert gen.loaded == ["v2"]  # v1 unloaded after its last stream


def test_closing_a_stream_stops_the_model():
    gen = tiny_generator(max_new_tokens=500)
    stream = gen.stream(MESSAGES)
    next(stream)
    stream.close()
    stream._thread.join(30)
    assert not stream._thread.is_alive()
    # The model is free again for the next generation.
    assert len(list(gen.stream(MESSAGES))) > 0


def test_a_failing_model_fails_the_stream_not_the_generator(monkeypatch):
    gen = tiny_generator()
    monkeypatch.setattr(
        gen.base, "generate", lambda **_: (_ for _ in ()).throw(RuntimeError("oom"))
    )
    with pytest.raises(GenerationError, match="generation failed: oom"):
        list(gen.stream(MESSAGES))
    monkeypatch.undo()
    assert gen._users[None] == 0
    assert len(list(gen.stream(MESSAGES))) > 0  # the model lock was released


def test_adapter_errors_are_clear(tmp_path, adapters):
    gen = tiny_generator()
    with pytest.raises(GenerationError, match=r"no adapter_config\.json"):
        gen.load_adapter("v9", tmp_path)
    with pytest.raises(GenerationError, match="not loaded"):
        gen.set_current("v9")
    with pytest.raises(GenerationError, match="not loaded"):
        gen.stream(MESSAGES, "v9")
    assert gen.current is None


def test_extractive_answer_cites_the_best_passages():
    passages = ["Employees get 25 vacation days. More text here.", "Remote work is allowed.", "x"]
    text = "".join(extractive_answer(passages, max_passages=2))
    assert text == "Employees get 25 vacation days. More text here. [1] Remote work is allowed. [2]"


def test_parse_announcement_accepts_only_registry_versions():
    a = AdapterAnnouncement(version=V1, uri="file:///x", base_model="m")
    assert parse_announcement(a.to_bytes()).version == V1
    for bad in (b'{"version": 1}', None):
        with pytest.raises(ValueError):
            parse_announcement(bad)
    for version in ("v3", "../../etc", "v0001-20260101T0000/../x", V1 + "\n"):
        raw = AdapterAnnouncement(version=version, base_model="m").to_bytes()
        with pytest.raises(ValueError, match="not an adapter version"):
            parse_announcement(raw)


def test_adapter_location_is_the_registry_folder_whatever_the_uri(tmp_path):
    settings = Settings(data_dir=tmp_path)
    ann = AdapterAnnouncement(version=V1, uri="file:///etc/secrets", base_model="m")
    assert adapter_location(settings, ann) == adapter_path(settings, V1)


def _announce(settings: Settings, version: str | None, uri: Path | None) -> None:
    p = producer(settings)
    ann = AdapterAnnouncement(version=version, uri=str(uri) if uri else None, base_model="tiny")
    p.send(settings.adapters_topic, key=b"current", value=ann.to_bytes()).get(30)
    p.close()


def _wait(predicate, timeout: float = 30.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        done.wait(0.05)
    return predicate()


def test_follower_applies_the_latest_announcement(settings):
    """Real broker: the backlog's last announcement wins; later ones swap live."""
    gen = tiny_generator()
    adapters = tiny_adapters(adapters_root(settings), gen.tokenizer, versions=(V1, V2))
    _announce(settings, V1, adapters[V1])
    p = producer(settings)
    p.send(settings.adapters_topic, key=b"current", value=b"not json").get(30)
    p.close()
    _announce(settings, V2, adapters[V2])
    follower = AdapterFollower(settings, gen)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert follower.ready.wait(30)
        assert gen.current == V2
        assert gen.loaded == [V2]  # V1 was superseded in the backlog: never loaded
        _announce(settings, V1, adapters[V1])
        assert _wait(lambda: gen.current == V1)
        _announce(settings, "v0003-20260101T0000", None)  # not on disk: keep serving V1
        _announce(settings, "../v1", None)  # not a version at all: ignored
        _announce(settings, None, None)
        assert _wait(lambda: gen.current is None)
        assert gen.loaded == []
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.slow
def test_real_smollm2_streams_an_answer(settings):
    from consumers.generation import load_generator

    gen = load_generator(settings.model_copy(update={"max_new_tokens": 24}))
    assert gen is not None
    stream = gen.stream(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What colour is the sky on a clear day?"},
        ]
    )
    pieces = [p for p in stream if p]
    assert len(pieces) >= 3
    assert "".join(pieces).strip()
