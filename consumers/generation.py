"""Streamed answers from one base model and many LoRA adapters, decoded together in batches.

One causal LM serves every query of a process. A single decoding thread owns it: each new
answer is prefilled alone and joins the running batch between two steps, every step is one
forward pass for all running answers (each row under its own adapter: peft's mixed-adapter
batches), and a closed answer leaves the batch at the next step. Greedy decoding, so an answer's
text is what it would be alone.

Adapters are named `<scope>/<version>` (models.adapters). Each scope (a tenant, or `_house` for
the shared house style) has a current adapter; an answer for a tenant is pinned when it starts to
the tenant's current adapter, else the house adapter, else the bare base model. Adapters load on
first use and stay while they are hot: beyond `adapter_cache_mb` the least recently used ones
that no answer is using are unloaded, and a version replaced as current goes once its last
answer ended. Swapping one scope's adapter touches no other scope's answers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Histogram
from transformers import TextIteratorStreamer

from consumers.batch import DecodeBatch, penalize, prefill
from headwater.errors import GenerationError
from headwater.events import HOUSE
from headwater.settings import Settings

log = logging.getLogger(__name__)

Message = dict[str, str]

TOKENS = Counter("headwater_generated_tokens_total", "Tokens generated for answers")
SPEED = Histogram(
    "headwater_generation_tokens_per_second",
    "Generation speed of one answer (new tokens / time from joining the batch to its end)",
    buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
)
ADAPTER = Counter(
    "headwater_adapter_swaps_total",
    "Adapters made current (hot swaps), by adapter name (<tenant>/<version>)",
    ["version"],
)

_AUTO = object()  # "the adapter the tenant gets when the generation starts"
REPETITION_PENALTY = 1.1


class Generation(Iterator[str]):
    """The text pieces of one answer (an iterator); `adapter` is the adapter it runs under.

    It starts at once (it joins the decoding batch at the next step); `close()` (or leaving a
    `with` block) takes it out of the batch.
    """

    def __init__(
        self,
        owner: Generator,
        input_ids: torch.Tensor,
        adapter: str | None,
        max_new_tokens: int,
        temperature: float | None = None,
    ) -> None:
        self.adapter = adapter
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature or None  # None (or 0): greedy
        self.error: BaseException | None = None
        self.started = 0.0  # monotonic time it joined the batch
        self.closed = threading.Event()
        self.produced: list[int] = []
        self._owner = owner
        self._streamer = TextIteratorStreamer(owner.tokenizer, skip_special_tokens=True)
        self._ended = threading.Event()
        self._exhausted = False

    def __next__(self) -> str:
        if not self._exhausted:
            for piece in self._streamer:
                if piece:  # the streamer emits "" while a word is incomplete
                    return piece
            self._exhausted = True
        if self.error is not None:
            raise GenerationError(f"generation failed: {self.error}") from self.error
        raise StopIteration

    def close(self) -> None:
        """Leave the batch, and wait until the decoding thread has let go of this answer."""
        if not self.closed.is_set():
            self.closed.set()
            self._owner._wake()
        if threading.current_thread() is not self._owner._thread:
            # A model still running in a daemon thread when the interpreter exits aborts it.
            self._ended.wait(timeout=30)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def completion_tokens(self) -> int:
        return len(self.produced)

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called by the decoding thread -----------------------------------------------------
    def _emit(self, token: int) -> None:
        self.produced.append(token)
        self._streamer.put(torch.tensor([token]))

    def _end(self, error: BaseException | None = None) -> None:
        if not self._ended.is_set():
            self.error = error
            self._streamer.end()
            self._ended.set()


@dataclass
class _Row:
    """A generation inside the batch, with what its next step needs."""

    gen: Generation
    seen: torch.Tensor  # distinct token ids so far (repetition penalty)
    seen_set: set[int] = field(default_factory=set)
    last: int = 0


@dataclass
class _Loaded:
    slot: str  # peft adapter name (adapter names hold "/", peft's must be plain)
    bytes: int


class Generator:
    """A causal LM (plus tokenizer) streaming answers under many LoRA adapters at once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 160,
        max_batch: int = 8,
        adapter_budget_mb: float = 256.0,
        repetition_penalty: float = REPETITION_PENALTY,
    ) -> None:
        self.base = model.eval()
        self.model: Any = self.base  # becomes the PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.budget_bytes = int(adapter_budget_mb * 2**20)
        self.penalty = repetition_penalty
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self._current: dict[str, str | None] = {}  # scope -> adapter name
        self._paths: dict[str, Path] = {}  # adapter name -> folder (load on first use)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}  # adapter name -> generations pinned to it
        self._retired: set[str] = set()  # replaced as current: unloaded once unpinned
        self._broken: set[str] = set()  # failed to load: skipped until offered again
        self._slots = 0
        self._state = threading.Lock()  # everything above
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not thread-safe
        self._work = threading.Condition()  # new generations, commands, closes
        self._pending: list[Generation] = []
        self._commands: list[tuple[str, str, Future]] = []
        self._batch = DecodeBatch()
        self._rows: list[_Row] = []
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._nudged = False
        self.steps = 0  # forward passes of the batch (tests and benchmarks read these)
        self.rows_stepped = 0
        self.step_seconds = 0.0

    # -- adapters --------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        with self._state:
            return sorted(self._loaded)

    @property
    def adapter_bytes(self) -> int:
        with self._state:
            return sum(a.bytes for a in self._loaded.values())

    def current(self, scope: str) -> str | None:
        with self._state:
            return self._current.get(scope)

    def offer(self, name: str, path: str | Path) -> None:
        """Adapter `name` can be loaded from `path` when first used."""
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise GenerationError(f"adapter {name!r}: no adapter_config.json in {path}")
        with self._state:
            self._paths[name] = path
            self._broken.discard(name)

    def load_adapter(self, name: str, path: str | Path | None = None) -> None:
        """Load adapter `name` now (from `path`, or where it was offered); no-op when loaded."""
        if path is not None:
            self.offer(name, path)
        with self._state:
            self._retired.discard(name)
            if name in self._loaded:
                return
        done: Future = Future()
        with self._work:
            self._commands.append(("load", name, done))
            self._work.notify()
        self._ensure_thread()
        done.result()

    def set_current(self, scope: str, name: str | None) -> None:
        """New generations of `scope` get adapter `name` (None: none of its own).

        The adapter must have been offered or loaded. Generations already running keep theirs.
        """
        with self._state:
            if name is not None and name not in self._paths and name not in self._loaded:
                raise GenerationError(f"adapter {name!r} is not loaded or offered")
            previous = self._current.get(scope)
            self._current[scope] = name
            self._retired.discard(name)  # type: ignore[arg-type]
            if previous is not None and previous != name:
                self._retired.add(previous)
        if previous != name:
            ADAPTER.labels(name or "<none>").inc()
            log.info(
                "%s: serving adapter %s (was %s)", scope, name or "<none>", previous or "<none>"
            )
            self._wake()

    def adapter_for(self, tenant: str | None) -> str | None:
        """The adapter a generation for `tenant` gets now: its own, else the house's, else none."""
        with self._state:
            return self._resolve(tenant)

    def _resolve(self, tenant: str | None) -> str | None:
        own = self._current.get(tenant) if tenant is not None else None
        if own is not None and own not in self._broken:
            return own
        house = self._current.get(HOUSE)
        return house if house not in self._broken else None

    # -- generation ------------------------------------------------------------------------
    def stream(
        self,
        prompt_messages: Sequence[Message],
        *,
        tenant: str | None = None,
        adapter: Any = _AUTO,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Start generating an answer to a chat; iterate the result for text pieces.

        The adapter is pinned now (by default the tenant's, see `adapter_for`; or the adapter
        name given, None for the bare base model): a swap while this generation runs does not
        change it. `max_new_tokens` can only lower the generator's own limit; a `temperature`
        above 0 samples, none or 0 decodes greedily.
        """
        limit = self.max_new_tokens
        if max_new_tokens is not None:
            limit = max(1, min(max_new_tokens, limit))
        if self._stopped:
            raise GenerationError("the generator was closed")
        with self._tokenizer_lock:
            ids = self.encode(prompt_messages)["input_ids"]
        with self._state:
            name = self._resolve(tenant) if adapter is _AUTO else adapter
            if name is not None and name not in self._loaded and name not in self._paths:
                raise GenerationError(f"adapter {name!r} is not loaded or offered")
            self._pin(name)
        gen = Generation(self, ids, name, limit, temperature)
        with self._work:
            self._pending.append(gen)
            self._work.notify()
        self._ensure_thread()
        return gen

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

    def close(self) -> None:
        """Stop the decoding thread; running generations end with an error."""
        with self._work:
            self._stopped = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- bookkeeping -----------------------------------------------------------------------
    def _pin(self, name: str | None) -> None:
        if name is not None:
            self._pins[name] = self._pins.get(name, 0) + 1

    def _unpin(self, name: str | None) -> None:
        if name is not None:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]

    def _wake(self) -> None:
        """A close or a swap: the decoding thread takes a turn even with nothing to decode."""
        with self._work:
            self._nudged = True
            self._work.notify()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._work:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="headwater-decode", daemon=True
                )
                self._thread.start()

    # -- the decoding thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                while not (self._stopped or self._pending or self._commands or self._rows
                           or self._nudged):  # fmt: skip
                    self._work.wait()
                self._nudged = False
                if self._stopped:
                    break
                commands, self._commands = self._commands, []
                waiting = [g for g in self._pending if not g.closed.is_set()]
                gone = [g for g in self._pending if g.closed.is_set()]
                room = self.max_batch - len(self._rows)
                joining, self._pending = waiting[:room], waiting[room:]
            for gen in gone:
                self._finish(gen)
            for _, name, done in commands:
                try:
                    self._load(name)
                    done.set_result(None)
                except BaseException as exc:
                    done.set_exception(exc)
            try:
                for gen in joining:
                    self._join(gen)
                self._leave()
                if self._rows:
                    self._step()
                self._unload_unused()  # what the step's finished generations no longer pin
            except Exception as exc:  # never die silently: end what runs, keep serving
                log.exception("decoding failed; %d generations end", len(self._rows))
                for row in self._rows:
                    self._finish(row.gen, exc)
                self._rows, self._batch = [], DecodeBatch()
        for row in self._rows:
            self._finish(row.gen, GenerationError("the generator was closed"))
        for gen in self._pending:
            self._finish(gen, GenerationError("the generator was closed"))

    def _join(self, gen: Generation) -> None:
        """Prefill a new generation alone and add it to the batch (or end it at once)."""
        if gen.closed.is_set():
            self._finish(gen)
            return
        gen.started = time.monotonic()
        try:
            slot = self._slot_for(gen)
            with torch.inference_mode():
                p = prefill(self.model, gen.input_ids, slot, self.model is not self.base)
            row = _Row(gen, torch.zeros(0, dtype=torch.long))
            self._see(row, gen.input_ids[0].tolist())
            token = self._pick(row, p.logits[0])
        except Exception as exc:
            log.warning("generation failed to start: %s", exc)
            self._finish(gen, exc)
            return
        if self._deliver(row, token):
            self._batch.join(p, slot)
            self._rows.append(row)

    def _slot_for(self, gen: Generation) -> str | None:
        """The peft slot of the generation's adapter, loading it on first use.

        An adapter that fails to load is skipped from then on: the generation falls back to
        the house adapter, else the base model (the failure is logged, not the answer's).
        """
        while gen.adapter is not None:
            try:
                return self._load(gen.adapter)
            except GenerationError as exc:
                log.error("adapter %s is unusable, falling back: %s", gen.adapter, exc)
                with self._state:
                    self._broken.add(gen.adapter)
                    self._unpin(gen.adapter)
                    house = self._current.get(HOUSE)
                    gen.adapter = house if house not in self._broken else None
                    self._pin(gen.adapter)
        return None

    def _step(self) -> None:
        tokens = torch.tensor([row.last for row in self._rows], dtype=torch.long)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self._batch.step(self.model, tokens, self.model is not self.base)
        except Exception as exc:
            log.warning("a decoding step failed (%d generations end): %s", len(self._rows), exc)
            for row in self._rows:
                self._finish(row.gen, exc)
            self._rows = []
            self._batch = DecodeBatch()
            return
        self.steps += 1
        self.rows_stepped += len(self._rows)
        self.step_seconds += time.perf_counter() - t0
        keep = []
        for i, row in enumerate(self._rows):
            if self._deliver(row, self._pick(row, logits[i])):
                keep.append(i)
        self._drop(keep)

    def _leave(self) -> None:
        """Closed generations leave the batch (between steps)."""
        keep = []
        for i, row in enumerate(self._rows):
            if row.gen.closed.is_set():
                self._finish(row.gen)
            else:
                keep.append(i)
        self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        if len(keep) != len(self._rows):
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        scores = penalize(logits, row.seen, self.penalty)
        t = row.gen.temperature
        if t:  # this row samples; the others in the batch stay greedy
            return int(torch.multinomial(torch.softmax(scores / t, dim=-1), 1))
        return int(torch.argmax(scores))

    def _see(self, row: _Row, tokens: list[int]) -> None:
        new = [t for t in dict.fromkeys(tokens) if t not in row.seen_set]
        if new:
            row.seen_set.update(new)
            row.seen = torch.cat([row.seen, torch.tensor(new, dtype=torch.long)])

    def _deliver(self, row: _Row, token: int) -> bool:
        """Hand a new token to its generation; False when the generation is over."""
        gen = row.gen
        if token in self.eos:
            self._finish(gen)
            return False
        with self._tokenizer_lock:
            gen._emit(token)
        TOKENS.inc()
        row.last = token
        self._see(row, [token])
        if len(gen.produced) >= gen.max_new_tokens or gen.closed.is_set():
            self._finish(gen)
            return False
        return True

    def _finish(self, gen: Generation, error: BaseException | None = None) -> None:
        if gen.produced and gen.started and not gen._ended.is_set():
            SPEED.observe(len(gen.produced) / max(time.monotonic() - gen.started, 1e-6))
        with self._tokenizer_lock:
            gen._end(error)
        with self._state:
            self._unpin(gen.adapter)

    # -- adapter memory (decoding thread only: it owns the model) ----------------------------
    def _load(self, name: str) -> str:
        with self._state:
            loaded = self._loaded.get(name)
            if loaded is not None:
                self._loaded.move_to_end(name)
                return loaded.slot
            path = self._paths.get(name)
            self._slots += 1
            slot = f"a{self._slots}"
        if path is None:
            raise GenerationError(f"adapter {name!r} is not loaded or offered")
        try:
            if self.model is self.base:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(
                    self.base, str(path), adapter_name=slot, is_trainable=False
                ).eval()
            else:
                self.model.load_adapter(str(path), adapter_name=slot, is_trainable=False)
        except Exception as exc:
            raise GenerationError(f"cannot load adapter {name!r} from {path}: {exc}") from exc
        size = sum(
            p.numel() * p.element_size()
            for n, p in self.model.named_parameters()
            if f".{slot}." in n
        )
        with self._state:
            self._loaded[name] = _Loaded(slot, size)
        log.info("loaded adapter %s (%.1f MiB) from %s", name, size / 2**20, path)
        self._unload_unused()
        return slot

    def _unload_unused(self) -> None:
        """Unload retired adapters nobody uses, then the coldest unused ones beyond the budget."""
        with self._state:
            idle = [n for n in self._loaded if not self._pins.get(n)]
            gone = [n for n in idle if n in self._retired]
            total = sum(a.bytes for n, a in self._loaded.items() if n not in gone)
            for n in idle:  # least recently used first
                if total <= self.budget_bytes:
                    break
                if n not in gone:
                    gone.append(n)
                    total -= self._loaded[n].bytes
            slots = [(n, self._loaded.pop(n).slot) for n in gone]
            self._retired -= set(gone)
        for name, slot in slots:
            try:
                remaining = [s for s in self.model.peft_config if s != slot]
                if not remaining:  # the last one: back to the bare base model
                    self.model.unload()
                    self.model = self.base
                else:
                    # peft's wrapper needs a valid active adapter (batches name their own).
                    if self.model.active_adapter == slot:
                        self.model.set_adapter(remaining[0])
                    self.model.delete_adapter(slot)
                log.info("unloaded adapter %s", name)
            except Exception as exc:  # a leftover adapter only costs memory
                log.warning("could not unload adapter %s: %s", name, exc)


def load_generator(settings: Settings) -> Generator | None:
    """The configured generator, or None when `settings.generator` is "" (extractive answers)."""
    if not settings.generator:
        return None
    from models.base import load_generator as load_model

    model, tokenizer = load_model(settings)
    return Generator(
        model,
        tokenizer,
        max_new_tokens=settings.max_new_tokens,
        max_batch=settings.generate_max_batch,
        adapter_budget_mb=settings.adapter_cache_mb,
    )


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
