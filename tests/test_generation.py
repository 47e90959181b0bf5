"""Streamed generation and adapter hot swap, on a tiny Llama built here (random weights).

The tiny model's tokenizer is word-level, so every generated token is one streamed piece, and
greedy decoding makes each (prompt, adapter) pair produce one exact text to compare against:
an answer decoded in a batch beside others must be exactly the answer decoded alone.
The builders here are imported by the answerer and gateway tests too.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from consumers.adapters import AdapterFollower, adapter_location, parse_announcement
from consumers.generation import Generator, extractive_answer
from headwater.errors import GenerationError
from headwater.events import HOUSE, AdapterAnnouncement
from headwater.runtime.clients import producer
from headwater.settings import Settings
from models.adapters import adapter_path, adapters_root, announcement_key

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
        (folder / version / "headwater.json").write_text("{}")  # complete, as the registry's
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
    """The whole answer alone (the base model, or the adapter name given)."""
    return "".join(generator.stream(messages, adapter=adapter[0] if adapter else None))


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
    gate = Gate(gen.base, at=4)  # the prefill and two steps run, then the model is held
    stream = gen.stream(MESSAGES)
    first = [next(stream), next(stream)]  # would block forever if pieces waited for the end
    assert gate.entered.wait(30)
    assert len(stream.produced) < 12 and not gate.released.is_set()
    gate.release()
    rest = list(stream)
    assert len([p for p in first + rest if p]) >= 6
    assert "".join(first + rest) == reference
    assert len(stream.produced) == 12


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


def test_greedy_decoding_is_transformers_generate():
    """The batching loop decodes exactly as `generate` (greedy, repetition penalty 1.1)."""
    gen = tiny_generator(max_new_tokens=16)
    ids = gen.encode(MESSAGES)
    out = tiny_model(gen.tokenizer).generate(
        **ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.1
    )
    want = gen.tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text_of(gen) == want


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Prompts of different lengths: the batch must pad them."""
    return [
        [{"role": "user", "content": "question " + "river " * i + "about the water"}]
        for i in range(n)
    ]


def run_together(gen: Generator, jobs: list[tuple[list, str | None]]) -> list[str]:
    """Start every (prompt, adapter) stream at once, read them all concurrently."""
    streams = [gen.stream(p, adapter=a) for p, a in jobs]
    out: list[str | None] = [None] * len(streams)

    def read(i: int) -> None:
        out[i] = "".join(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out  # type: ignore[return-value]


def test_concurrent_streams_decode_together_each_as_if_alone(adapters):
    gen = tiny_generator(max_new_tokens=16)
    gen.offer("a/v1", adapters["v1"])
    gen.offer("b/v2", adapters["v2"])
    jobs = [(p, (None, "a/v1", "b/v2")[i % 3]) for i, p in enumerate(prompts(8))]
    alone = [text_of(gen, p, a) for p, a in jobs]
    assert len(set(alone)) >= 5  # different prompts and adapters, mostly different answers
    steps, rows = gen.steps, gen.rows_stepped
    assert rows == steps  # one at a time so far: one row per forward pass
    gate = Gate(gen.base)  # hold the model so all eight join before the first step
    held = threading.Thread(target=lambda: gate.entered.wait(30) and time.sleep(0.5))
    held.start()
    together = []
    t = threading.Thread(target=lambda: together.extend(run_together(gen, jobs)))
    t.start()
    held.join()
    gate.release()
    t.join(120)
    assert together == alone  # mixed adapters in one batch, each text exactly as alone
    steps, rows = gen.steps - steps, gen.rows_stepped - rows
    assert rows / steps > 4  # one forward pass served several streams


def test_each_stream_keeps_its_own_length_and_temperature_in_a_batch():
    gen = tiny_generator(max_new_tokens=16)
    a, b, c = prompts(3)
    ref_a = text_of(gen, a)
    torch.manual_seed(0)
    short = gen.stream(b, adapter=None, max_new_tokens=3)  # a lower limit for this one only
    sampled = gen.stream(c, adapter=None, temperature=5.0)  # samples; its neighbours do not
    greedy = gen.stream(a, adapter=None, max_new_tokens=1000)  # cannot raise the limit
    texts = ["".join(s) for s in (short, sampled, greedy)]
    assert short.completion_tokens == 3 and short.prompt_tokens == short.input_ids.shape[1]
    assert greedy.completion_tokens <= 16 and texts[2] == ref_a
    torch.manual_seed(1)
    again = [text_of_sampled(gen, c) for _ in range(3)]
    assert len({texts[1], *again}) > 1  # temperature 5 on a tiny vocabulary: they differ


def text_of_sampled(gen: Generator, messages) -> str:
    return "".join(gen.stream(messages, adapter=None, temperature=5.0))


def test_a_new_stream_joins_the_running_batch():
    gen = tiny_generator(max_new_tokens=300)
    long_p, short_p = prompts(2)
    ref_long, ref_short = text_of(gen, long_p), text_of(gen, short_p)
    gate = Gate(gen.base, at=6)  # the first stream's prefill and four steps, then held
    first = gen.stream(long_p)
    assert gate.entered.wait(30)
    second = gen.stream(short_p)  # waits for the step boundary, not for the first to finish
    shared_before = gen.rows_stepped - gen.steps
    gate.release()
    head = next(second)
    assert len(first.produced) < 300  # it joined while the first was generating
    assert head + "".join(second) == ref_short
    assert "".join(first) == ref_long
    assert gen.rows_stepped - gen.steps > shared_before  # steps that carried both


def test_a_closed_stream_leaves_the_batch_and_the_others_go_on(adapters):
    gen = tiny_generator(max_new_tokens=40)
    p1, p2 = prompts(2)
    ref = text_of(gen, p2)
    gate = Gate(gen.base, at=3)
    doomed, kept = gen.stream(p1), gen.stream(p2)
    assert gate.entered.wait(30)
    # close() waits for the decoding thread to let go, which the gate holds: close meanwhile.
    closer = threading.Thread(target=doomed.close)
    closer.start()
    assert _wait(doomed.closed.is_set)
    gate.release()
    closer.join(30)
    assert not closer.is_alive()
    assert "".join(kept) == ref
    assert len(doomed.produced) < 40
    list(doomed)  # its end was signalled: reading it does not block
    assert _wait(lambda: len(gen._rows) == 0)


def test_closing_a_stream_stops_its_generation():
    gen = tiny_generator(max_new_tokens=500)
    stream = gen.stream(MESSAGES)
    next(stream)
    stream.close()
    assert _wait(lambda: not gen._rows and not gen._pending)
    assert len(stream.produced) < 500
    assert len(list(gen.stream(MESSAGES))) > 0  # the model serves the next one


def test_a_failing_model_fails_the_stream_not_the_generator(monkeypatch):
    gen = tiny_generator()
    real = gen.base.forward
    monkeypatch.setattr(gen.base, "forward", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("oom")))  # fmt: skip
    with pytest.raises(GenerationError, match="generation failed: oom"):
        list(gen.stream(MESSAGES))
    monkeypatch.setattr(gen.base, "forward", real)
    assert gen._pins == {}
    assert len(list(gen.stream(MESSAGES))) > 0  # the decoding thread survived


def test_tenants_get_their_own_adapter_else_the_house_one_else_the_base(adapters):
    gen = tiny_generator()
    base = text_of(gen)
    gen.offer("a/v1", adapters["v1"])
    gen.offer(f"{HOUSE}/v2", adapters["v2"])
    gen.set_current("a", "a/v1")
    assert gen.adapter_for("a") == "a/v1" and gen.adapter_for("b") is None
    assert gen.loaded == []  # offered, not loaded: it loads on first use
    a_text = text_of(gen, MESSAGES, "a/v1")
    assert gen.loaded == ["a/v1"]
    assert "".join(gen.stream(MESSAGES, tenant="a")) == a_text != base
    assert "".join(gen.stream(MESSAGES, tenant="b")) == base
    gen.set_current(HOUSE, f"{HOUSE}/v2")
    house = gen.stream(MESSAGES, tenant="b")
    assert house.adapter == f"{HOUSE}/v2" and "".join(house) not in (base, a_text)
    assert gen.stream(MESSAGES, tenant="a").adapter == "a/v1"  # its own comes first
    gen.set_current(HOUSE, None)
    assert "".join(gen.stream(MESSAGES, tenant="b")) == base
    assert _wait(lambda: gen.loaded == ["a/v1"])  # the retired house version was unloaded


def test_a_swap_for_one_tenant_never_disturbs_another(adapters, tmp_path):
    tok = tiny_tokenizer()
    more = tiny_adapters(tmp_path, tok, versions=("x1", "x2", "x3"))
    gen = tiny_generator(max_new_tokens=12)
    for name, path in {"a/v1": adapters["v1"], "a/v2": adapters["v2"], "b/v1": more["x1"],
                       "b/v2": more["x2"]}.items():  # fmt: skip
        gen.offer(name, path)
    ps = prompts(10)
    ref = {(i, a): text_of(gen, p, a) for i, p in enumerate(ps) for a in ("a/v1", "a/v2", "b/v1")}
    gen.set_current("a", "a/v1")
    gen.set_current("b", "b/v1")
    gate = Gate(gen.base)
    streams = {i: gen.stream(ps[i], tenant="ab"[i % 2]) for i in range(6)}  # a, b, a, b, ...
    assert gate.entered.wait(30)
    gen.set_current("a", "a/v2")  # a's swap, while a's and b's streams are in flight
    streams |= {i: gen.stream(ps[i], tenant="ab"[i % 2]) for i in range(6, 10)}
    gate.release()
    texts = {i: "".join(s) for i, s in streams.items()}
    for i, s in streams.items():
        want = "b/v1" if i % 2 else ("a/v1" if i < 6 else "a/v2")
        assert s.adapter == want and texts[i] == ref[(i, want)], i
    assert _wait(lambda: gen.loaded == ["a/v2", "b/v1"])  # a/v1 went after its last stream


def test_adapters_beyond_the_memory_budget_are_unloaded_coldest_first(tmp_path):
    tok = tiny_tokenizer()
    paths = tiny_adapters(tmp_path, tok, versions=("x1", "x2", "x3"))
    gen = tiny_generator(max_new_tokens=4)
    for name, path in paths.items():
        gen.offer(f"t{name}/{name}", path)
    text_of(gen, MESSAGES, "tx1/x1")
    one = gen.adapter_bytes
    assert one > 0
    gen.budget_bytes = 2 * one  # room for two
    text_of(gen, MESSAGES, "tx2/x2")
    text_of(gen, MESSAGES, "tx1/x1")  # x1 is now hotter than x2
    text_of(gen, MESSAGES, "tx3/x3")
    assert gen.loaded == ["tx1/x1", "tx3/x3"] and gen.adapter_bytes == 2 * one
    # A pinned adapter is never unloaded, whatever the budget.
    gen.budget_bytes = 0
    gate = Gate(gen.base)
    running = gen.stream(MESSAGES, adapter="tx2/x2")
    assert gate.entered.wait(30)  # x2 loaded for it, the unused ones went beyond the budget
    assert gen.loaded == ["tx2/x2"]
    gate.release()
    assert "".join(running)
    assert _wait(lambda: gen.loaded == [])


def test_an_adapter_that_fails_to_load_falls_back(tmp_path, adapters):
    gen = tiny_generator()
    base = text_of(gen)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    gen.offer("a/v9", broken)
    gen.set_current("a", "a/v9")
    stream = gen.stream(MESSAGES, tenant="a")
    assert "".join(stream) == base and stream.adapter is None
    assert gen.adapter_for("a") is None  # skipped from then on
    gen.offer(f"{HOUSE}/v1", adapters["v1"])
    gen.set_current(HOUSE, f"{HOUSE}/v1")
    assert gen.adapter_for("a") == f"{HOUSE}/v1"


def test_adapter_errors_are_clear(tmp_path, adapters):
    gen = tiny_generator()
    with pytest.raises(GenerationError, match=r"no adapter_config\.json"):
        gen.load_adapter("a/v9", tmp_path)
    with pytest.raises(GenerationError, match="not loaded or offered"):
        gen.set_current("a", "a/v8")
    with pytest.raises(GenerationError, match="not loaded or offered"):
        gen.stream(MESSAGES, adapter="a/v8")
    assert gen.current("a") is None


def test_extractive_answer_cites_the_best_passages():
    passages = ["Employees get 25 vacation days. More text here.", "Remote work is allowed.", "x"]
    text = "".join(extractive_answer(passages, max_passages=2))
    assert text == "Employees get 25 vacation days. More text here. [1] Remote work is allowed. [2]"


def test_parse_announcement_accepts_only_registry_versions_and_scopes():
    a = AdapterAnnouncement(tenant="acme", version=V1, uri="file:///x", base_model="m")
    assert parse_announcement(a.to_bytes()).version == V1
    assert parse_announcement(a.to_bytes()).tenant == "acme"
    for bad in (b'{"version": 1}', None, b'{"version": null, "base_model": "m"}'):
        with pytest.raises(ValueError):
            parse_announcement(bad)
    for version in ("v3", "../../etc", "v0001-20260101T0000/../x", V1 + "\n"):
        raw = AdapterAnnouncement(tenant="acme", version=version, base_model="m").to_bytes()
        with pytest.raises(ValueError, match="not an adapter version"):
            parse_announcement(raw)
    for scope in ("..", "a/b", "_other", ""):
        raw = json.dumps({"tenant": scope, "version": V1, "base_model": "m"}).encode()
        with pytest.raises(ValueError, match="tenant"):
            parse_announcement(raw)


def test_adapter_location_is_the_registry_folder_whatever_the_uri(tmp_path):
    settings = Settings(data_dir=tmp_path)
    ann = AdapterAnnouncement(tenant="acme", version=V1, uri="file:///etc/x", base_model="m")
    assert adapter_location(settings, ann) == adapter_path(settings, "acme", V1)
    assert adapter_location(settings, ann) == tmp_path / "adapters" / "acme" / V1


def _announce(settings: Settings, scope: str, version: str | None, key: bytes | None = None):
    p = producer(settings)
    ann = AdapterAnnouncement(tenant=scope, version=version, base_model="tiny")
    p.send(settings.adapters_topic, key=key or announcement_key(scope), value=ann.to_bytes()).get(
        30
    )
    p.close()


def _wait(predicate, timeout: float = 30.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        done.wait(0.05)
    return predicate()


def test_follower_keeps_each_tenant_on_its_latest_announcement(settings):
    """Real broker: each scope's last announcement wins; later ones swap only that scope."""
    gen = tiny_generator()
    root = adapters_root(settings)
    a = tiny_adapters(root / "a", gen.tokenizer, versions=(V1, V2))
    tiny_adapters(root / "b", gen.tokenizer, versions=(V1,))
    _announce(settings, "a", V1)
    p = producer(settings)
    p.send(settings.adapters_topic, key=announcement_key("a"), value=b"not json").get(30)
    p.close()
    _announce(settings, "a", V2)
    _announce(settings, "b", V1)
    _announce(settings, "b", None, key=announcement_key("a"))  # under another scope's key
    follower = AdapterFollower(settings, gen)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert follower.ready.wait(30)
        assert gen.current("a") == f"a/{V2}" and gen.current("b") == f"b/{V1}"
        assert gen.loaded == []  # announced adapters load on first use
        text_of(gen, MESSAGES, f"a/{V2}")
        assert gen.loaded == [f"a/{V2}"]
        _announce(settings, "a", V1)  # a is hot: V1 is loaded before the switch
        assert _wait(lambda: gen.current("a") == f"a/{V1}")
        assert _wait(lambda: gen.loaded == [f"a/{V1}"])  # V2 had no user left
        assert gen.current("b") == f"b/{V1}"  # b untouched
        _announce(settings, "a", "v0003-20260101T0000")  # not on disk: keep serving V1
        _announce(settings, "a", "../v1")  # not a version at all: ignored
        assert a[V1].is_dir()
        _announce(settings, "a", None)
        assert _wait(lambda: gen.current("a") is None)
        assert _wait(lambda: gen.loaded == [])
        assert gen.current("b") == f"b/{V1}"
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
