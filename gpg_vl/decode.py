"""The decode loop's model side with nothing allocated per token: the N rows' keys and values sit in one
pre-allocated transformers `StaticCache` (the prompt written once, after it was prefilled once per prompt),
the attention mask is built once, and one step function maps (tokens, positions, cache) to the last logits.
Where group attention applies (gpg_vl.group_attention: the CPU, float32) the cache holds the completions'
keys/values only (`completion_cache`) and the prompt is read from the prefill's cache, once per group.

Why static: the dynamic cache concatenates every layer's keys and values each token, and a step whose
shapes never change is what `torch.compile` (and CUDA graphs, `mode="reduce-overhead"`) can capture.
Traps: the cache length is rounded up to a bucket so that prompts of similar length reuse one compiled
graph; the slots past the current token are masked twice, by causality (the cache's own length counter, a
tensor, is the query offset) and by the 2-D mask, which flash-attention alone reads; positions are M-RoPE positions
passed explicitly (see gpg_vl.prefix), computed outside the compiled step so a step index never becomes a
graph constant; sampling stays outside too, so the RNG draws exactly what the eager loop draws.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers import StaticCache

from gpg_vl.prefix import PromptPrefix, cache_kwarg

DECODE_MODES = ("dynamic", "static", "compiled")
CACHE_BUCKET = 64  # slots: the static cache's length is a multiple of this
# The smallest weight `packed_linears` packs: oneDNN's packed product costs ~15 us more per call, and beats the
# plain GEMM only from about 256 x 256 weights (measured with 32 rows: 96 x 288 1.5x slower, 384 x 128 1.3x
# slower, 256 x 256 0.79x, 384 x 1536 0.61x in a step). So `tiny` packs nothing; `small-20m` its MLP, q and o.
PACK_MIN_WEIGHTS = 65536


def cache_length(prompt_length: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """Slots for a prompt of `prompt_length` tokens and `max_new_tokens` more, rounded up to `bucket`."""
    return -(-(prompt_length + max_new_tokens) // bucket) * bucket


def static_cache(model, prefix: PromptPrefix, max_cache_len: int, reuse: StaticCache | None = None) -> StaticCache:
    """A StaticCache of `max_cache_len` slots per row holding `prefix`'s keys/values in slots [0, P).

    `prefix` is already selected to its N rows; its dynamic cache is read once, here. `reuse`: a cache of
    the same shape to refill instead of allocating one (CUDA graphs replay on fixed addresses); its slots
    from P on keep old values, which causality masks until this decode writes them.
    """
    layers = prefix.cache.layers
    first = layers[0].keys
    if not _fits(reuse, first, max_cache_len):
        reuse = empty_cache(model, max_cache_len)
    _check_layers(len(layers), reuse)
    P = prefix.attention_mask.shape[1]
    for static, dynamic in zip(reuse.layers, layers):
        if not static.is_initialized:
            static.lazy_initialization(dynamic.keys, dynamic.values)  # [N, kv_heads, max_cache_len, head_dim]
        static.keys[:, :, :P].copy_(dynamic.keys)
        static.values[:, :, :P].copy_(dynamic.values)
        static.cumulative_length.fill_(P)  # the next token goes to slot P; also the query offset of the causal mask
    return reuse


def empty_cache(model, max_cache_len: int) -> StaticCache:
    """A StaticCache of `max_cache_len` slots per row, its tensors allocated by the first forward that writes
    to it (or by `lazy_initialization`)."""
    return StaticCache(config=getattr(model, "module", model).config, max_cache_len=max_cache_len)


def completion_cache(model, prompt_keys: list[torch.Tensor], prompt_values: list[torch.Tensor], rows: int, max_cache_len: int) -> StaticCache:
    """The completions' own StaticCache beside group attention's prompt (which it reads from the prefill):
    `max_cache_len` zeroed slots for each of `rows` rows, per layer shaped like that layer's prompt keys/values
    [B, kv_heads, P, head_dim]. Allocated now, not by the first forward: a compiled step then sees one
    initialised cache from its first token on (lazily, the first token would compile a graph of its own)."""
    cache = empty_cache(model, max_cache_len)
    _check_layers(len(prompt_keys), cache)
    for layer, keys, values in zip(cache.layers, prompt_keys, prompt_values):
        layer.lazy_initialization(keys.new_empty(rows, keys.shape[1], 0, keys.shape[3]), values.new_empty(rows, values.shape[1], 0, values.shape[3]))
    return cache


def _check_layers(prefill_layers: int, cache: StaticCache) -> None:
    if prefill_layers != len(cache.layers):
        raise RuntimeError(f"prefill cache has {prefill_layers} layers, the static cache {len(cache.layers)}")


def _fits(cache: StaticCache | None, keys: torch.Tensor, max_cache_len: int) -> bool:
    if cache is None or not cache.layers[0].is_initialized:
        return False
    held = cache.layers[0].keys
    return held.shape[0] == keys.shape[0] and held.shape[2] == max_cache_len and held.dtype == keys.dtype and held.device == keys.device


def static_mask(prefix: PromptPrefix, max_cache_len: int) -> torch.Tensor:
    """[N, max_cache_len]: the prompt's padding mask, then zeros; the decode loop sets slot P+t to 1 before
    token t goes in. sdpa and eager attention hide unwritten slots by causality anyway; flash-attention
    reads only this 2-D mask, so without the zeros it would attend to them."""
    N, P = prefix.attention_mask.shape
    mask = prefix.attention_mask.new_zeros(N, max_cache_len)
    mask[:, :P] = prefix.attention_mask
    return mask


class DecodeStep:
    """One decode step of `model`: (tokens [N, 1], positions [3, N, 1], mask, cache) -> logits [N, V].

    compile: wrap the step in `torch.compile` (mode "reduce-overhead", i.e. CUDA graphs, on CUDA; the default
    mode on the CPU). The compiled function is kept, so later rollouts with the same shapes reuse its graph.
    On the CPU in float32 the graph takes in what the eager step runs there: the products with the weights of
    `packed_linears` (through the opaque operator `torch.ops.gpg_vl.packed_linear`, `register_packed_linear`;
    each packed copy a graph input) and group attention over every completion slot (`GroupPrompt.written`),
    so the one graph serves every rollout of a shape while the weights change between them.
    """

    def __init__(self, model, compile: bool = False):
        self.policy = getattr(model, "module", model)  # DDP's forward already ran in prefill
        self.cache_name = cache_kwarg(model)
        self.compiled = compile
        self._fn = self._forward
        if compile:
            register_packed_linear()
            cuda = next(self.policy.parameters()).device.type == "cuda"
            self._fn = torch.compile(self._forward, mode="reduce-overhead" if cuda else None)

    def _forward(self, tokens, positions, mask, cache):
        out = self.policy(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_name: cache},
        )
        return out.logits[:, -1]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        logits = self._fn(tokens, positions, mask, cache)
        # CUDA graphs reuse their output buffer at the next replay: copy before anything keeps it
        return logits.clone() if self.compiled else logits


def static_expands_the_cache(model) -> bool:
    """True where every static decode step would copy the whole pre-allocated KV cache: grouped-query attention
    through transformers' sdpa with a mask, in a transformers whose sdpa lacks `pack_gqa` (before 5.23; vLLM's
    environment pins 5.19). There each step's `repeat_kv` copies all slots of every layer (2.8 s of
    copies in a `small-20m` rollout, 2.2x the dynamic loop's time); the dynamic cache copies only its length."""
    text = getattr(model, "module", model).config.get_text_config()
    grouped = getattr(text, "num_key_value_heads", None) not in (None, text.num_attention_heads)
    return grouped and text._attn_implementation == "sdpa" and not sdpa_packs_gqa()


def sdpa_packs_gqa() -> bool:
    """Whether the installed transformers' sdpa folds a one-token query's heads onto their KV heads
    (`pack_gqa`, transformers >= 5.23) instead of repeating the keys and values."""
    from transformers.integrations import sdpa_attention

    return hasattr(sdpa_attention, "pack_gqa")


def float32_on_cpu(model) -> bool:
    """Whether the model's weights are float32 on the CPU: where the decode's CPU paths (packed weights, group
    attention) apply, as measured and tested."""
    weight = next(getattr(model, "module", model).parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def can_pack_linears(model) -> bool:
    """True where `packed_linears` applies: float32 weights on the CPU, with oneDNN's packed linear in torch."""
    return float32_on_cpu(model) and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@contextlib.contextmanager
def packed_linears(model, rows: int):
    """Inside the block, the language model's linear layers multiply with weights reordered once into oneDNN's
    blocked layout for `rows` input rows, instead of a plain GEMM that re-reads the row-major weights each
    call. For the decode loop: one rollout reuses the same weights for every token, and a GEMM of 32 rows on
    the CPU spends more time on its weight layout than on arithmetic (measured on the project machine: the 33
    weight products of a `small-20m` step, cold in cache, 12.6 ms plain and 7.7 ms packed).

    Only plain `nn.Linear` layers of float32 CPU weights of at least PACK_MIN_WEIGHTS elements are packed: a
    LoRA layer keeps its own forward and adds its adapters around its plain base layer, which is packed; a
    quantized layer is left alone. The packed copies, as large as those weights, live until
    the block ends; then the layers get their own forward back. No gradient flows through the packed product:
    for decoding under `torch.no_grad`.

    Trap (a compiled step): each packed copy is an attribute of its layer (`PACKED`), read by the forward at
    every call, not bound into the forward. torch.compile then takes it as a graph input, guarded on its shape
    only, so the next rollout's copies (the weights changed in between) reuse the graph; bound into the
    forward, each new copy invalidated the graph and recompiled it."""
    policy = getattr(model, "module", model)
    layers = [
        m for m in _text_modules(policy)
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
        and m.weight.numel() >= PACK_MIN_WEIGHTS
    ]
    try:
        for layer in layers:
            setattr(layer, PACKED, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows))
            layer.forward = functools.partial(_packed_forward, layer)
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop(PACKED, None)


PACKED = "_gpg_vl_packed_weight"  # the attribute holding a layer's packed weight inside `packed_linears`


def _packed_forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(layer, PACKED)
    if torch.compiler.is_compiling():  # inductor lowers oneDNN's op for frozen weights only: keep it opaque
        return torch.ops.gpg_vl.packed_linear(x, packed, layer.bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, layer.bias, "none", [], "")


def register_packed_linear() -> None:
    """Define the operator `torch.ops.gpg_vl.packed_linear` (once per process): x @ W.T + bias with W packed by
    `torch.ops.mkldnn._reorder_linear_weight`, which torch.compile calls as it is (its own lowering of oneDNN's
    op asserts a constant, frozen weight). Defined when a compiled step is built, not at import: a process
    that never compiles registers nothing. (Defined at import, a finished ZeRO-3 rank aborted at exit in 3 of
    16 runs of tests/test_deepspeed.py's zero3 test, 0 of 20 once defined here; but the abort came back once
    after that in CI, so the registration was not shown to be its cause: gpg_vl.cli.entry is the fix.)"""
    if hasattr(torch.ops.gpg_vl, "packed_linear"):
        return

    @torch.library.custom_op("gpg_vl::packed_linear", mutates_args=())
    def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    @packed_linear.register_fake
    def _(x, packed, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))  # a packed [out, in] weight keeps its logical shape


def _text_modules(policy):
    """The modules a decode step runs through the language model's layers (the vision tower ran in prefill).
    The LM head is left plain: at a real vocabulary its packed copy would cost as much memory as a small
    model's whole decoder (151,936 x 1,536 fp32 at Qwen2-VL-2B: 890 MiB, next to the 7.3 GiB of a step)."""
    return policy.get_decoder().modules()
