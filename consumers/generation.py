"""Streamed answer generation with a hot-swappable LoRA style adapter.

One causal LM is shared by every query of a process. Each adapter version is loaded under its
own peft name, so a swap only changes which name new generations pin; a generation keeps the
version it started with, and an old version is unloaded after its last generation finished.
Generations run one at a time (a model lock): peft's active adapter is model-wide state, and
on a small CPU box one generation already uses the cores.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Histogram
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from headwater.errors import GenerationError
from headwater.settings import Settings

log = logging.getLogger(__name__)

Message = dict[str, str]

_CURRENT = object()  # "the adapter that is current when the generation starts"

TOKENS = Counter("headwater_generated_tokens_total", "Tokens generated for answers")
SPEED = Histogram(
    "headwater_generation_tokens_per_second",
    "Generation speed of one answer (new tokens / generation time)",
    buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
)
ADAPTER = Counter(
    "headwater_adapter_swaps_total", "Adapter versions made current (hot swaps)", ["version"]
)


class _Cancel(StoppingCriteria):
    """Stops a generation whose reader went away, so the model lock is released promptly."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class Generation(Iterator[str]):
    """The text pieces of one running generation (an iterator); `adapter` is the pinned version.

    Generation starts at once in a worker thread; `close()` (or leaving a `with` block) stops it.
    """

    def __init__(
        self,
        owner: Generator,
        inputs: dict[str, Any],
        adapter: str | None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.adapter = adapter
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.completion_tokens = 0  # known once the generation ended
        self.max_new_tokens = int((options or {}).get("max_new_tokens", owner.max_new_tokens))
        self._options = options or {}
        self._owner = owner
        self._cancel = _Cancel()
        self._error: BaseException | None = None
        self._streamer = TextIteratorStreamer(
            owner.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        self._thread = threading.Thread(
            target=self._work, args=(inputs,), name="headwater-generate", daemon=True
        )
        self._thread.start()

    def _work(self, inputs: dict[str, Any]) -> None:
        try:
            self.completion_tokens = self._owner._generate(
                inputs, self.adapter, self._streamer, self._cancel, self._options
            )
        except BaseException as exc:  # reported to the reader, never lost in the thread
            self._error = exc
            self._streamer.on_finalized_text("", stream_end=True)

    def __next__(self) -> str:
        try:
            piece = next(self._streamer)
            while not piece:  # the streamer emits "" while a word is incomplete
                piece = next(self._streamer)
            return piece
        except StopIteration:
            self._thread.join()
            if self._error is not None:
                raise GenerationError(f"generation failed: {self._error}") from self._error
            raise

    def close(self) -> None:
        """Stop generating and wait for the model to let go (it checks between tokens)."""
        self._cancel.event.set()
        if self._thread is not threading.current_thread():
            # A model still running in a daemon thread when the interpreter exits aborts it.
            self._thread.join(timeout=30)

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Generator:
    """A causal LM (plus tokenizer) that streams answers, with LoRA adapters swapped live."""

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 160) -> None:
        self.base = model.eval()
        self.model: Any = self.base  # becomes the PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.current: str | None = None
        self._loaded: dict[str, Path] = {}
        self._users: dict[str | None, int] = {}
        # Versions replaced as current; each is unloaded once its last generation ended. (Only
        # these: a version just loaded but not yet made current must survive until it is.)
        self._retired: set[str] = set()
        self._model_lock = threading.Lock()  # held by each generation and each model change
        self._state_lock = threading.Lock()  # current version, loaded versions, user counts
        # A fast tokenizer raises "Already borrowed" when two threads encode at once.
        self._tokenizer_lock = threading.Lock()

    # -- adapters --------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        with self._state_lock:
            return sorted(self._loaded)

    def load_adapter(self, version: str, path: str | Path) -> None:
        """Load adapter `version` from a peft folder (no-op when it is already loaded)."""
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise GenerationError(f"adapter {version!r}: no adapter_config.json in {path}")
        with self._state_lock:
            self._retired.discard(version)
            if version in self._loaded:
                return  # without waiting for the model: announcements repeat on restart
        with self._model_lock:
            with self._state_lock:
                if version in self._loaded:
                    return
            try:
                if self.model is self.base:
                    from peft import PeftModel

                    self.model = PeftModel.from_pretrained(
                        self.base, str(path), adapter_name=version, is_trainable=False
                    ).eval()
                else:
                    self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
            except Exception as exc:
                raise GenerationError(
                    f"cannot load adapter {version!r} from {path}: {exc}"
                ) from exc
            with self._state_lock:
                self._loaded[version] = path
        log.info("loaded adapter %s from %s", version, path)

    def release(self, version: str) -> None:
        """A version loaded for generations that asked for it by name: unload it after its last
        generation ends, unless it is (or becomes) the current one."""
        # No model lock here: a running generation holds it, and unloads retired versions itself.
        with self._state_lock:
            if version != self.current and version in self._loaded:
                self._retired.add(version)

    def set_current(self, version: str | None) -> None:
        """Serve `version` (None: the bare base model) to generations that start from now on."""
        with self._state_lock:
            if version is not None and version not in self._loaded:
                raise GenerationError(f"adapter {version!r} is not loaded")
            previous, self.current = self.current, version
            self._retired.discard(version)
            if previous is not None and previous != version:
                self._retired.add(previous)
        if previous != version:
            ADAPTER.labels(version or "<base>").inc()
            log.info("serving adapter %s (was %s)", version or "<base>", previous or "<base>")
        with self._model_lock:
            self._unload_unused()

    def _unload_unused(self) -> None:
        """Drop retired versions no generation uses any more (caller holds the model lock)."""
        with self._state_lock:
            idle = [v for v in self._retired if v in self._loaded and not self._users.get(v)]
            for v in idle:
                del self._loaded[v]
                self._retired.discard(v)
        for v in idle:
            try:
                self.model.delete_adapter(v)
                log.info("unloaded adapter %s", v)
            except Exception as exc:  # a leftover adapter only costs memory
                log.warning("could not unload adapter %s: %s", v, exc)

    # -- generation ------------------------------------------------------------------------
    def stream(
        self,
        prompt_messages: Sequence[Message],
        adapter: Any = _CURRENT,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Start generating an answer to a chat; iterate the result for text pieces.

        `adapter` defaults to the current version, pinned now: a swap while this generation
        waits or runs does not change it. `max_new_tokens` can only lower the generator's own
        limit; a `temperature` above 0 samples, none or 0 decodes greedily.
        """
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if max_new_tokens is not None:
            options["max_new_tokens"] = max(1, min(max_new_tokens, self.max_new_tokens))
        if temperature:
            options |= {"do_sample": True, "temperature": float(temperature)}
        with self._tokenizer_lock:
            inputs = self.encode(prompt_messages)
        with self._state_lock:
            version = self.current if adapter is _CURRENT else adapter
            if version is not None and version not in self._loaded:
                raise GenerationError(f"adapter {version!r} is not loaded")
            self._users[version] = self._users.get(version, 0) + 1
        return Generation(self, inputs, version, options)

    def encode(self, messages: Sequence[Message]) -> dict[str, Any]:
        """Token ids of the prompt: the chat template when there is one, else plain turns."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            # Control tokens inside documents or questions stay text: no prompt-format injection.
            enc = tok.apply_chat_template(
                list(messages),
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
                sanitize_control_tokens=True,
            )
        else:
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
            enc = tok(text + "\n\nAssistant:", return_tensors="pt", split_special_tokens=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _generate(
        self,
        inputs: dict[str, Any],
        version: str | None,
        streamer: TextIteratorStreamer,
        cancel: _Cancel,
        options: dict[str, Any] | None = None,
    ) -> int:
        """Run one generation into `streamer`; returns the number of tokens generated."""
        with self._model_lock:
            try:
                kwargs = dict(
                    inputs,
                    streamer=streamer,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    repetition_penalty=1.1,
                    stopping_criteria=StoppingCriteriaList([cancel]),
                    pad_token_id=self._pad_id(),
                )
                kwargs.update(options or {})
                t0 = time.monotonic()
                with torch.inference_mode():
                    if version is not None:
                        self.model.set_adapter(version)
                        out = self.model.generate(**kwargs)
                    elif self.model is not self.base and self.loaded:
                        with self.model.disable_adapter():
                            out = self.model.generate(**kwargs)
                    else:
                        out = self.base.generate(**kwargs)
                generated = int(out.shape[-1] - inputs["input_ids"].shape[-1])
                _count(generated, time.monotonic() - t0)
                return generated
            finally:
                with self._state_lock:
                    self._users[version] -= 1
                self._unload_unused()

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        return tok.eos_token_id


def _count(tokens: int, seconds: float) -> None:
    if tokens > 0:
        TOKENS.inc(tokens)
        SPEED.observe(tokens / max(seconds, 1e-6))


def load_generator(settings: Settings) -> Generator | None:
    """The configured generator, or None when `settings.generator` is "" (extractive answers)."""
    if not settings.generator:
        return None
    from models.base import load_generator as load_model

    model, tokenizer = load_model(settings)
    return Generator(model, tokenizer, max_new_tokens=settings.max_new_tokens)


# -- extractive answers (no generator) -------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def extractive_answer(passages: Sequence[str], *, max_passages: int = 3) -> Iterator[str]:
    """An answer made of the best passages' leading sentences, each with its marker like [1].

    Yields word-sized pieces so the answer streams like a generated one.
    """
    for i, text in enumerate(passages[:max_passages], start=1):
        sentences = [s for s in _SENTENCE.split(" ".join(text.split())) if s]
        lead = " ".join(sentences[:2])
        if not lead:
            continue
        words = lead.split(" ")
        prefix = "" if i == 1 else " "
        for j, word in enumerate(words):
            yield (prefix if j == 0 else " ") + word
        yield f" [{i}]"
