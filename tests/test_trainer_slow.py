"""The real offline base model (SmolLM2-135M-Instruct): conversion, a short LoRA run, hot swap.

`make soak` only (~100 s): `make test` trains the tiny model through the same code
(tests/test_trainer_runs.py) and loads and answers with the real one (tests/test_answerer.py).
"""

from __future__ import annotations

import json

import pytest

from headwater.events import ExampleEvent
from headwater.settings import DEFAULT_GENERATOR
from models.adapters import adapter_path
from models.base import GGUF_FILE, gguf_folder, load_generator, resolve_model
from tests.test_trainer_runs import announcements, publish
from trainer.examples import is_heldout
from trainer.registry import Registry
from trainer.scheduler import TrainerService

TOPICS = ["Kafka", "Milvus", "LoRA", "Python", "a river", "a compacted topic", "an index"]


@pytest.mark.soak
@pytest.mark.slow
def test_real_model_conversion_lora_run_and_adapter_swap(settings):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Conversion (once per cache; done here if this machine has not done it yet).
    folder = resolve_model(DEFAULT_GENERATOR, settings.cache_dir)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_model("/some/local/path", settings.cache_dir) == "/some/local/path"
    fp32 = settings.model_copy(update={"train_dtype": "float32"})
    model, tok = load_generator(fp32, DEFAULT_GENERATOR)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    # The converted weights are the GGUF's weights: same logits on the same prompt.
    gguf = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)
    ids = tok("Kafka keeps a log of events.", return_tensors="pt")["input_ids"]
    assert (
        ids.tolist()
        == gguf_tok("Kafka keeps a log of events.", return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        want = gguf(input_ids=ids).logits.float()
        got = model.float()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    del gguf

    # A short LoRA run in its own process on style examples.
    s = settings.model_copy(
        update={
            "train_steps": 3,
            "train_batch_size": 2,
            "train_max_seq_tokens": 128,
            "gate_max_holdout": 2,
            "gate_max_new_tokens": 12,
            "train_timeout_s": 900,
        }
    )
    examples = []
    for i in range(24):
        topic = TOPICS[i % len(TOPICS)]
        answer = json.dumps({"answer": f"{topic} is worth knowing.", "confidence": "high"})
        examples.append(
            ExampleEvent(
                example_id=f"real-{i}",
                tenant="default",
                prompt=f"In one line, what is {topic}?",
                response=f"{answer}\n-- Headwater Bot",
            )
        )
    assert any(is_heldout(e.example_id, s.gate_holdout_fraction) for e in examples)
    publish(s, examples)
    service = TrainerService(s)
    service.tracker.update()
    outcome = service.train("default", "slow test")
    assert outcome.status in ("accepted", "rejected"), outcome
    version = outcome.version
    path = adapter_path(s, "default", version)
    meta = json.loads((path / "headwater.json").read_text())
    assert meta["base_model"] == DEFAULT_GENERATOR
    assert meta["config"]["r"] == 8 and meta["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert meta["metrics"]["after"]["n"] >= 1
    size = (path / "adapter_model.safetensors").stat().st_size
    assert 0.5e6 < size < 5e6
    assert Registry(s, "default").listing()["versions"][-1]["status"] == outcome.status
    if outcome.promoted:
        assert [a.version for a in announcements(s)] == [version]

    # Hot swap as the query consumer does it: load_adapter + set_adapter on the base model.
    base, tok = load_generator(s, DEFAULT_GENERATOR)
    prompt = tok("What is Kafka?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base(input_ids=prompt).logits.float()
    peft_model = PeftModel.from_pretrained(base, path, adapter_name=version)
    peft_model.set_adapter(version)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=prompt).logits.float()
    assert not torch.allclose(plain, adapted)  # the trained LoRA changes the model
