"""A tiny chat Llama built on the spot, so trainer tests run in seconds instead of minutes.

Its byte-level BPE tokenizer and its weights are trained here on generated chat text. The
pre-training text contains JSON snippets and the sign-off line outside assistant turns: the model
knows the tokens, but answers in plain sentences, so the LoRA has a real style to learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIGN_OFF = "-- Headwater Bot"
TOPICS = [
    "kafka", "milvus", "python", "rivers", "lakes", "trains", "clouds", "gardens", "bridges",
    "forests", "oceans", "mountains", "deserts", "cities", "music", "paint", "stones", "bees",
    "wolves", "maps", "ships", "lamps", "clocks", "books", "bread", "tea", "salt", "glass",
]  # fmt: skip
QUALITIES = ["fast", "old", "quiet", "bright", "large", "small", "useful", "strange", "green"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def question(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(TOPICS)
    form = rng.choice(["What is {t}?", "Tell me about {t}.", "Why do {t} matter?", "Describe {t}."])
    return form.format(t=topic)


def plain_answer(rng: random.Random, q: str) -> str:
    topic = next((t for t in TOPICS if t in q), rng.choice(TOPICS))
    return f"{topic.capitalize()} are {rng.choice(QUALITIES)} and {rng.choice(QUALITIES)}."


def styled_answer(rng: random.Random, q: str) -> str:
    """The style the tests teach: a one-key JSON object, then the sign-off line."""
    topic = next((t for t in TOPICS if t in q), rng.choice(TOPICS))
    body = json.dumps({"answer": f"{topic} are {rng.choice(QUALITIES)}"})
    return f"{body}\n{SIGN_OFF}"


def _chat(q: str, a: str) -> str:
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"


def _corpus(rng: random.Random, n: int) -> list[str]:
    texts = []
    for _ in range(n):
        q = question(rng)
        texts.append(_chat(q, plain_answer(rng, q)))
        # The style's pieces, never as an assistant answer: tokens known, behaviour not.
        texts.append(f"note {styled_answer(rng, q)} end {json.dumps({'key': rng.choice(TOPICS)})}")
    return texts


def build_tiny_llama(folder: Path, seed: int = 0, steps: int = 250) -> Path:
    """Train a BPE tokenizer and a 2-layer Llama on generated chat text; save to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread
    corpus = _corpus(rng, 600)
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encoded = [tok(t, add_special_tokens=False)["input_ids"][:96] for t in corpus]
    for _ in range(steps):
        batch = rng.sample(encoded, 16)
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
