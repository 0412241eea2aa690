"""LoRA adapters over the one NF4 base: many adapters, and rows with none, in one batch.

The base model's projections (q/k/v/o/gate/up/down) stay the model's own bitsandbytes modules;
the base matmul runs once for the whole batch. A forward hook on each targeted module adds

    delta = ((x @ A_all^T) * w_row) @ B_all        x [R, T, in], A_all [n*r, in], B_all [n*r, out]

where A_all/B_all stack the n loaded adapters (ranks zero-padded to r) and w_row [R, n] holds each
row's scale in its adapter's column and zeros elsewhere, so a row without an adapter gets exactly
nothing. Every tensor is preallocated (stacks at LRU capacity, w at the most rows a batch has) and
updated in place, so a captured CUDA graph stays valid as adapters load and rows move; the graph
key carries `key()` so a batch with no adapter row replays a graph without the LoRA path. The
extra cost is 2 * n * r * (in + out) FLOPs a row per module: small next to in * out while n * r is
a few hundred.

Loading goes through peft (PeftConfig.from_pretrained, load_peft_weights); the checks and the
placement below are plain functions of the config and the tensors, with no I/O.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .host import upload

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 64
# peft's key for one LoRA matrix of one projection, adapter name already stripped by load_peft_weights.
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# LoraConfig options that change the forward or the base weights: name -> what we tell the user.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "megatron_config": "megatron_config",
    "use_bdlora": "use_bdlora",
    "arrow_config": "arrow_config",
    "kasa_config": "kasa_config",
    "velora_config": "velora_config",
    "monteclora_config": "monteclora_config",
}
# Initialisations that also rewrite the base weights: the adapter is only right over that rewrite.
_BASE_REWRITING_INITS = ("loftq", "pissa", "olora", "corda")


class AdapterError(Exception):
    """This adapter cannot run on this model; its items fail with invalid_request and this message."""


@dataclass
class Adapter:
    source: str  # local path or hub id, as the job registered it
    rank: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A [r, in], B [out, r])


# -- reading (the only I/O) -------------------------------------------------------


def read(source: str) -> tuple[object, dict[str, torch.Tensor]]:
    """(peft config, state dict on the CPU) of a LoRA directory or hub id, through peft's own loaders."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(source)
        weights = load_peft_weights(source, device="cpu")
    except Exception as exc:  # a missing file, a hub id that does not exist, a corrupt safetensors
        raise AdapterError(f"adapter {source!r} could not be read: {type(exc).__name__}: {exc}") from exc
    return config, weights


# -- checks and placement (no I/O) -----------------------------------------------------


def scale_of(config) -> float:
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def check_config(source: str, config, model_names: list[str]) -> None:
    """Refuse what the engine cannot compute exactly, and an adapter trained for another base."""
    kind = str(getattr(config, "peft_type", "?")).split(".")[-1]
    if kind != "LORA":
        raise AdapterError(f"adapter {source!r} is a {kind} adapter; only LoRA adapters are supported")
    for name, what in _UNSUPPORTED.items():
        if getattr(config, name, None):
            raise AdapterError(f"adapter {source!r} uses {what}, which is not supported")
    if getattr(config, "bias", "none") != "none":
        raise AdapterError(f"adapter {source!r} trains biases (bias={config.bias!r}), which is not supported")
    init = str(getattr(config, "init_lora_weights", "")).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise AdapterError(f"adapter {source!r} was initialised with {init!r}, which also changes the base "
                           "weights; convert it to a plain LoRA adapter first")
    if not 1 <= config.r <= MAX_RANK:
        raise AdapterError(f"adapter {source!r} has rank {config.r}; ranks 1 to {MAX_RANK} are supported")
    base = getattr(config, "base_model_name_or_path", None)
    if base and model_names and not any(same_model(base, m) for m in model_names):
        raise AdapterError(f"adapter {source!r} was trained on {base!r}, but this worker runs {model_names[0]!r}")


def same_model(a: str, b: str) -> bool:
    """Compare by the last path component, case-folded, ignoring a bnb-4bit re-upload's suffix:
    a local copy or a pre-quantized repo of a model is the same base as its hub id."""
    def norm(s: str) -> str:
        name = s.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower()
        return re.sub(r"(-unsloth)?-bnb-4bit$", "", name)
    return norm(a) == norm(b)


def parse_weights(source: str, state: dict[str, torch.Tensor]) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """peft state dict -> {(layer, proj): {"A": [r, in], "B": [out, r]}}; anything else is refused."""
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise AdapterError(f"adapter {source!r} has weights for {key!r}; only LoRA on "
                               f"{'/'.join(TARGETS)} is supported")
        out.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    for (layer, proj), ab in out.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {source!r}: layers.{layer}.{proj} lacks lora_{'AB'[('A' in ab)]}")
    if not out:
        raise AdapterError(f"adapter {source!r} holds no LoRA weights")
    return out


def fit(source: str, model_name: str, parsed: dict, shapes: dict[tuple[int, str], tuple[int, int]],
        rank: int, scale: float) -> Adapter:
    """Check every matrix against the base's (in, out) for that module; name both sides on a mismatch."""
    weights = {}
    for (layer, proj), ab in sorted(parsed.items()):
        a, b = ab["A"], ab["B"]
        if (layer, proj) not in shapes:
            raise AdapterError(f"adapter {source!r} does not fit model {model_name!r}: it has "
                               f"layers.{layer}.{proj}, the model has {len({k[0] for k in shapes})} layers")
        n_in, n_out = shapes[(layer, proj)]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1] \
                or a.shape[0] > rank:
            raise AdapterError(
                f"adapter {source!r} does not fit model {model_name!r}: layers.{layer}.{proj} has lora_A "
                f"{list(a.shape)} and lora_B {list(b.shape)}, the model's {proj} maps {n_in} to {n_out}")
        weights[(layer, proj)] = (a, b)
    return Adapter(source, rank, scale, weights)


def load(source: str, model_names: list[str], shapes: dict[tuple[int, str], tuple[int, int]]) -> Adapter:
    config, state = read(source)
    check_config(source, config, model_names)
    return fit(source, model_names[0], parse_weights(source, state), shapes, config.r, scale_of(config))


def target_modules(model) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, proj) -> the base module, for a Llama-layout model."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for proj in TARGETS:
                if hasattr(parent, proj):
                    out[(i, proj)] = getattr(parent, proj)
    return out


def module_shape(module) -> tuple[int, int]:
    return module.in_features, module.out_features


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, T, in], a [n, r, in], b [n, r, out], w [R, n] (row's scale at its adapter) -> [R, T, out]."""
    n, r, _ = a.shape
    R, T, _ = x.shape
    h = F.linear(x, a.reshape(n * r, -1))  # [R, T, n*r]: every loaded adapter's down-projection
    # Keep only the row's own adapter. w is float32: a bf16 scale such as rsLoRA's 16/sqrt(8) would be
    # off by up to 0.4%, where peft multiplies by the exact Python float.
    h = (h.view(R, T, n, r) * w[:, None, :, None]).to(h.dtype).view(R, T, n * r)
    return h @ b.reshape(n * r, -1)  # [R, T, out]


# -- the registry ---------------------------------------------------------------------------


class Registry:
    """Adapters loaded into a fixed number of stack slots (LRU), and each batch row's adapter.

    Rows are the runner's slots: row j of a decode step is slot j. assign() sets rows on prefill,
    move() follows the scheduler's compaction, select() arms the hooks for the rows of the next
    forward and returns the part of the CUDA graph key that depends on adapters.
    """

    def __init__(self, model, model_names: list[str], capacity: int, max_rows: int, dtype, device):
        self.model_names = model_names
        self.capacity = max(1, capacity)
        self.dtype, self.device = dtype, device
        self.modules = target_modules(model)
        self.shapes = {k: module_shape(m) for k, m in self.modules.items()}
        self.lru: OrderedDict[str, int] = OrderedDict()  # source -> stack slot, least recent first
        self.slot_scale = [0.0] * self.capacity
        self.rank = 0  # the stacks' rank; grows (reallocating) when a bigger adapter loads
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # [capacity, rank, in]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # [capacity, rank, out]
        self.w = torch.zeros(max_rows, self.capacity, dtype=torch.float32, device=device)  # [rows, capacity]
        self.row_slot = [-1] * max_rows  # host mirror of w: the stack slot of each row's adapter
        self.generation = 0  # bumped whenever a stack is reallocated: captured graphs hold the old ones
        self.rows = slice(0, 0)
        self.n = 0  # adapter slots the armed forward computes over; 0 = hooks do nothing
        self.hooks: dict[tuple[int, str], object] = {}

    # -- adapters ----------------------------------------------------------------

    @property
    def loaded(self) -> int:
        return len(self.lru)

    def acquire(self, source: str) -> int:
        """The stack slot holding `source`, loading it (and evicting the least recent) if needed."""
        if source in self.lru:
            self.lru.move_to_end(source)
            return self.lru[source]
        adapter = load(source, self.model_names, self.shapes)  # raises AdapterError before anything changes
        if len(self.lru) < self.capacity:
            slot = len(self.lru)  # slots fill from 0, so the live stacks are [0, n)
        else:
            _, slot = self.lru.popitem(last=False)
        self._place(adapter, slot)
        self.lru[source] = slot
        return slot

    def _place(self, adapter: Adapter, slot: int) -> None:
        if adapter.rank > self.rank:
            self._grow(adapter.rank)
        for key in adapter.weights:
            if key not in self.a:
                self._stack(key)
        with torch.no_grad():
            for key in self.a:  # zero every module: the slot may have held an adapter with other targets
                self.a[key][slot].zero_()
                self.b[key][slot].zero_()
            for key, (a, b) in adapter.weights.items():
                r = a.shape[0]
                self.a[key][slot, :r].copy_(a)
                self.b[key][slot, :r].copy_(b.t())
        self.slot_scale[slot] = adapter.scale
        for j, s in enumerate(self.row_slot):  # rows still pointing at the slot take the new scale
            if s == slot:
                self.w[j, slot] = adapter.scale

    def _grow(self, rank: int) -> None:
        # Round up so a few adapters of nearby ranks share one allocation.
        self.rank = min(MAX_RANK, -(-rank // 16) * 16)
        for key in list(self.a):
            old_a, old_b = self.a[key], self.b[key]
            self._stack(key)
            self.a[key][:, :old_a.shape[1]].copy_(old_a)
            self.b[key][:, :old_b.shape[1]].copy_(old_b)
        self.generation += 1

    def _stack(self, key) -> None:
        n_in, n_out = self.shapes[key]
        self.a[key] = torch.zeros(self.capacity, self.rank, n_in, dtype=self.dtype, device=self.device)
        self.b[key] = torch.zeros(self.capacity, self.rank, n_out, dtype=self.dtype, device=self.device)
        if key not in self.hooks:
            self.hooks[key] = self.modules[key].register_forward_hook(self._hook(key))
        self.generation += 1

    def _hook(self, key):
        def hook(module, args, out):
            if not self.n:
                return None  # no row of this forward has an adapter: the base output as is
            x = args[0]
            squeeze = x.dim() == 2  # [R, in] from a caller that is not ours
            x3 = x[:, None] if squeeze else x
            d = lora_delta(x3.to(self.dtype), self.a[key][:self.n], self.b[key][:self.n],
                           self.w[self.rows, :self.n])
            return out + (d[:, 0] if squeeze else d).to(out.dtype)
        return hook

    # -- rows --------------------------------------------------------------------

    def assign(self, first_row: int, slots: list[int]) -> None:
        """Rows first_row.. get these adapter slots (-1: none), before their prefill."""
        for j, s in enumerate(slots, start=first_row):
            self.row_slot[j] = s
        rows = torch.zeros(len(slots), self.capacity)  # built on the host: one copy to the device
        for i, s in enumerate(slots):
            if s >= 0:
                rows[i, s] = self.slot_scale[s]
        self.w[first_row:first_row + len(slots)].copy_(upload(rows, self.w.dtype, self.w.device))

    def move(self, src: int, dst: int) -> None:
        self.row_slot[dst] = self.row_slot[src]
        self.w[dst].copy_(self.w[src])

    def select(self, first_row: int, rows: int, live: int | None = None) -> tuple:
        """Arm the hooks for rows [first_row, first_row + rows); the adapters' share of a graph key.

        live: how many of those rows are real (decode buckets rows up); only they decide whether
        the LoRA path runs at all.
        """
        live = rows if live is None else live
        self.rows = slice(first_row, first_row + rows)
        active = any(s >= 0 for s in self.row_slot[first_row:first_row + live])
        self.n = len(self.lru) if active else 0
        return (self.n, self.generation) if self.n else ()


def groups(adapters: list[str | None], capacity: int) -> list[list[int]]:
    """Indices split so each group names at most `capacity` distinct adapters (rows with none go
    first); every adapter of a group is then held at once. One group when they all fit."""
    order: list[str] = list(dict.fromkeys(a for a in adapters if a))
    if len(order) <= capacity:
        return [list(range(len(adapters)))] if adapters else []
    group_of = {a: k // capacity for k, a in enumerate(order)}
    out: list[list[int]] = [[] for _ in range(-(-len(order) // capacity))]
    for i, a in enumerate(adapters):
        out[group_of[a] if a else 0].append(i)
    return out
