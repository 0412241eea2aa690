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


@pytest.fixture(scope="module")
def alone(engine, adapters):
    """Engine tokens per adapter (and None: the base), each adapter in a batch of its own."""
    e = variant(engine)
    out = {}
    for name in (None, *adapters):
        res = e.generate_all([Request(id=i, prompt=p, params=greedy(8), adapter=adapters.get(name))
                              for i, p in enumerate(PROMPTS)])
        assert all(r.ok for r in res), [r.error_message for r in res]
        out[name] = [r.token_ids for r in res]
    return out


@pytest.mark.parametrize("name", ["all7", "rs"])
def test_engine_equals_peft_generate(engine, pristine, adapters, alone, name):
    assert alone[name] == peft_generate(engine, pristine, adapters[name], PROMPTS, 8)
    assert alone[name] != alone[None]  # the adapter really changes the output


def test_mixed_batch_equals_separate_runs(engine, adapters, alone):
    # Few slots: rows finish, move down and are replaced, so adapters follow rows between slots.
    columns = max(len(engine.tokenizer(p)["input_ids"]) for p in PROMPTS) + 8
    e = variant(engine, max_batch_tokens=4 * columns)  # 4 slots for 12 rows
    names = [None, "all7", "rs"]
    reqs = [Request(id=(n, i), prompt=p, params=greedy(8), adapter=adapters.get(n))
            for i, p in enumerate(PROMPTS) for n in names]
    res = {r.id: r for r in e.generate_all(reqs)}
    assert e.stats.prefills > 1
    for n in names:  # base rows (None) are unaffected by their neighbours' adapters
        assert [res[(n, i)].token_ids for i in range(len(PROMPTS))] == alone[n], n


def test_lru_of_one_runs_adapters_in_turn(engine, adapters, alone):
    e = variant(engine, max_adapters=1)
    reqs = [Request(id=(n, i), prompt=p, params=greedy(8), adapter=adapters[n])
            for i, p in enumerate(PROMPTS[:2]) for n in ("all7", "rs")]
    res = {r.id: r for r in e.generate_all(reqs)}
    for n in ("all7", "rs"):
        assert [res[(n, i)].token_ids for i in range(2)] == alone[n][:2]
    assert e.lora.loaded == 1


def test_wrong_shape_adapter_fails_its_items_only(engine, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "tiny")
    e = variant(engine)
    res = e.generate_all([Request(id="bad", prompt=PROMPTS[0], params=greedy(2), adapter=str(tmp_path / "tiny")),
                          Request(id="ok", prompt=PROMPTS[0], params=greedy(2))])
    assert res[0].error_code == "invalid_request"
    assert str(tmp_path / "tiny") in res[0].error_message and engine.config.model in res[0].error_message
    assert "q_proj" in res[0].error_message and "576" in res[0].error_message  # the model's width, named
    assert res[1].ok and res[1].usage.completion_tokens == 2


def test_missing_adapter_fails_its_items(engine, tmp_path):
    res = variant(engine).generate_all([Request(id=0, prompt="Hi", params=greedy(2), adapter=str(tmp_path / "nope"))])
    assert res[0].error_code == "invalid_request" and "could not be read" in res[0].error_message


# -- checks on the config alone ----------------------------------------------------------------


def _config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=ALL, **kw)


@pytest.mark.parametrize("kw, words", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"init_lora_weights": "pissa"}, "base weights"),
])
def test_unsupported_options_are_refused(kw, words):
    with pytest.raises(lora.AdapterError, match=words):
        lora.check_config("x", _config(**kw), ["smollm2-135m-instruct"])


def test_rank_above_64_is_refused():
    from peft import LoraConfig

    with pytest.raises(lora.AdapterError, match="rank 128"):
        lora.check_config("x", LoraConfig(r=128, target_modules=ALL), [])


def test_other_base_model_is_refused_naming_both():
    cfg = _config(base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(lora.AdapterError, match="meta-llama/Llama-3.1-8B-Instruct.*smollm2-135m-instruct"):
        lora.check_config("x", cfg, ["smollm2-135m-instruct"])
    # A local copy, or a bnb-4bit re-upload, of the same base is the same base.
    lora.check_config("x", cfg, ["/models/Llama-3.1-8B-Instruct"])
    lora.check_config("x", _config(base_model_name_or_path="unsloth/Llama-3.1-8B-Instruct-bnb-4bit"),
                      ["meta-llama/Llama-3.1-8B-Instruct"])


def test_scale_plain_and_rslora():
    assert lora.scale_of(_config()) == 2.0
    assert lora.scale_of(_config(use_rslora=True)) == pytest.approx(16 / 8 ** 0.5)


def test_groups_hold_at_most_capacity_adapters():
    assert lora.groups([None, "a", None], 2) == [[0, 1, 2]]
    groups = lora.groups(["a", None, "b", "c", "a"], 2)
    assert groups == [[0, 1, 2, 4], [3]]
    assert lora.groups([], 4) == []


def test_lora_delta_selects_each_rows_adapter():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 16), torch.randn(3, 4, 8)
    x = torch.randn(2, 5, 16)
    w = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # row 0: adapter 1 at scale 2; row 1: none
    d = lora.lora_delta(x, a, b, w)
    torch.testing.assert_close(d[0], 2.0 * (x[0] @ a[1].T) @ b[1])
    assert torch.count_nonzero(d[1]) == 0


def test_run_with_adapters_end_to_end(adapters, sqlite_url, tmp_path):
    """`llmbatch run --adapter`: the named adapter, the base, and a wrong-shape adapter that fails alone."""
    from click.testing import CliRunner
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmbatch.jobs.cli import cli
    from tests.support import write_jsonl

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    get_peft_model(tiny, LoraConfig(r=4, target_modules=["o_proj"])).save_pretrained(tmp_path / "tiny")
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "a", "prompt": PROMPTS[0], "adapter": "all7"},
        {"custom_id": "b", "prompt": PROMPTS[0]},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": PROMPTS[0]}},
    ])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "run", str(path), "-o", str(out),
                                      "--max-tokens", "8", "--adapter", f"all7={adapters['all7']}",
                                      "--adapter", f"tiny={tmp_path / 'tiny'}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [rows[c]["adapter"] for c in "abc"] == ["all7", None, "tiny"]
    assert rows["a"]["status"] == rows["b"]["status"] == "succeeded"
    assert rows["a"]["output"] != rows["b"]["output"]
    assert rows["c"]["status"] == "failed" and rows["c"]["error"]["code"] == "invalid_request"
    assert "does not fit model 'smollm2-135m-instruct'" in rows["c"]["error"]["message"]
