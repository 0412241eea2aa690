"""LoRA adapters in the engine (worker/engine/lora.py) on the bundled SmolLM2-135M in NF4 on the CPU.

The adapters are made here with peft (random, non-zero lora_B) and saved with save_pretrained; the
reference is peft's own `generate` over a copy of the engine's loaded NF4 model, in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from llmbatch.worker.engine import Request, SamplingParams
from llmbatch.worker.engine import lora
from llmbatch.worker.engine.engine import Engine

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "1, 2, 3, 4, 5,",
    "A recipe for bread needs flour, water, salt and",
]
ALL = list(lora.TARGETS)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


@pytest.fixture(scope="module")
def pristine(engine):
    """The engine's model loaded once more, never run: a copy of a bitsandbytes model that has run on
    the CPU computes something else (its weights are repacked on first use), and NF4 quantization is
    deterministic, so copies of this one hold exactly the engine's weights."""
    from llmbatch.worker.engine import loading

    return loading.load(engine.config)[0]


def base_copy(model):
    return copy.deepcopy(model)


def make_adapter(model, path, seed: int, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base_copy(model), LoraConfig(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(pristine, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "all7": make_adapter(pristine, d / "all7", 1, r=8, lora_alpha=16, target_modules=ALL),
        "rs": make_adapter(pristine, d / "rs", 2, r=16, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    }


def variant(engine, **overrides) -> Engine:
    config = dataclasses.replace(engine.config, **overrides)
    return Engine(config, loaded=(engine.model, engine.tokenizer, engine.device, engine.dtype))


def peft_generate(engine, pristine, adapter_path: str, prompts: list[str], n: int) -> list[list[int]]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_copy(pristine), adapter_path).eval()
    tok, out = engine.tokenizer, []
    for p in prompts:  # one at a time: no padding in the reference
        enc = tok(p, return_tensors="pt")
        seq = model.generate(**enc, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        out.append(seq[0, enc["input_ids"].shape[1]:].tolist())
    return out


@pytest.mark.parametrize("name", ["all7", "rs"])
def test_engine_equals_peft_generate(engine, pristine, adapters, name):
    e = variant(engine)
    res = e.generate_all([Request(id=i, prompt=p, params=greedy(8), adapter=adapters[name])
                          for i, p in enumerate(PROMPTS)])
    assert all(r.ok for r in res), [r.error_message for r in res]
    assert [r.token_ids for r in res] == peft_generate(engine, pristine, adapters[name], PROMPTS, 8)
    base = e.generate_all([Request(id=i, prompt=p, params=greedy(8)) for i, p in enumerate(PROMPTS)])
    assert [r.token_ids for r in res] != [r.token_ids for r in base]  # the adapter really changed something
