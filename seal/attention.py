"""Attention for the batched updater's packed training passes on a CPU.

A packed pass lays several rows end to end under a block-diagonal causal mask (`seal.multilora.PackedBatch`).
On a CPU, PyTorch's scaled_dot_product_attention takes such a masked pass through its flash kernel, which is
made for long sequences: at the lengths of SEAL's passes (tens to a few hundred tokens) its backward costs
far more than its arithmetic. Written as batched matrix products instead, with each key/value head's query
heads side by side (grouped-query attention without copying keys and values), the scores in float32 (in bf16
under bf16 autocast, which casts the products' operands) with the mask added as a bias, then softmax, forward
and backward of one SmolLM2 layer in bf16 on one thread of the 2-core CPU, TCMalloc
(`benchmarks/attention_speed.py`) took 0.47 ms against 0.88 at 41 tokens, 2.1 against 3.8-4.0 at 160, 4.8-5.4
against 6.8-7.2 at 256 (and 20 against 25 at 512). Passes longer than `MAX_TOKENS` go to SDPA: the scores
and probabilities kept for backward grow with the square of the length (about 175 MB a SmolLM2 pass at 256
tokens in float32, 700 MB at 512), for less and less gain.

`packed_attention(lm)` switches a model from transformers' "sdpa" to this implementation for a block (the
batched updater's training on a CPU). Anything that is not a packed pass (a batch of several rows, no mask, a
cache, dropout) goes to SDPA as before. Under bf16 autocast on an AVX-512 CPU with the C++ kernels,
`seal.multilora.fused_attentions` computes the same, rotary embedding included, in one node a layer, row by
row of the pass (`fusable`, `block_starts`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from seal.models import LM

NAME = "seal_packed"
MAX_TOKENS = 256  # longer passes go to SDPA
_derived = threading.local()  # per thread (lanes train side by side): what the last mask gave (`per_mask`)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, heads, T, width], key and value [1, kv_heads, T, width],
    `attention_mask` [1, 1, T, T] booleans (True: may attend). Returns the output as [1, T, heads, width]."""
    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    packed = (
        batch == 1
        and key.shape[2] == length
        and length <= MAX_TOKENS
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and not dropout
        and kwargs.get("softcap") is None
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = heads // kv_heads  # query head h reads key/value head h // groups, as transformers' repeat_kv
    scaling = width**-0.5 if scaling is None else scaling
    scores = torch.baddbmm(
        mask_bias(attention_mask, groups),
        query.reshape(kv_heads, groups * length, width).float(),
        key[0].float().transpose(1, 2),
        alpha=scaling,
    )
    probs = scores.softmax(-1).to(value.dtype)
    output = (probs @ value[0]).view(1, heads, length, width)
    return output.transpose(1, 2).contiguous(), None


def mask_bias(attention_mask: torch.Tensor, groups: int) -> torch.Tensor:
    """The float32 bias [groups x T, T] (0 where the boolean [1, 1, T, T] mask allows, -inf elsewhere) that
    every key/value head's `groups` query heads add to their scores."""

    def build() -> torch.Tensor:
        length = attention_mask.shape[-1]
        bias = torch.zeros(length, length, device=attention_mask.device)
        return bias.masked_fill_(~attention_mask[0, 0], -torch.inf).repeat(groups, 1)

    return per_mask(attention_mask, ("bias", groups), build)


def block_starts(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """For a boolean [1, 1, T, T] mask under which each token attends to a run of keys ending at itself (a
    packed pass's, `block_causal_mask`): each token's first key, int64 [T]. None for any other mask."""

    def build() -> torch.Tensor | None:
        allowed = attention_mask[0, 0]
        starts = allowed.int().argmax(-1)  # each row's first True (0 for a row without one: refused below)
        keys = torch.arange(allowed.shape[-1], device=allowed.device)
        runs = (keys[None, :] >= starts[:, None]) & (keys[None, :] <= keys[:, None])
        return starts if torch.equal(allowed, runs) else None

    return per_mask(attention_mask, "starts", build)


def per_mask(attention_mask: torch.Tensor, key: object, build: Callable[[], object]) -> Any:
    """`build()`, once per mask and key on each thread: every layer of a pass gets the same mask tensor, so
    what is derived from it is derived once a pass rather than once a layer (not under torch.compile, which
    traces the building into its graph)."""
    if torch.compiler.is_compiling():
        return build()
    last = getattr(_derived, "value", None)
    if last is None or last[0] is not attention_mask or last[1] != attention_mask._version:
        last = _derived.value = (attention_mask, attention_mask._version, {})
    if key not in last[2]:
        last[2][key] = build()
    return last[2][key]


def fusable(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
) -> torch.Tensor | None:
    """For a Llama-style attention module's call: the first key of each token (`block_starts`) where the call
    is a packed pass that `seal.multilora.fused_attentions` computes in one node (bf16 autocast on a CPU, this
    module's implementation on, no cache, no dropout, rows of at most MAX_TOKENS tokens, an even head width,
    float32 rotary embeddings), else None: the module's own forward computes it. The node keeps each row's
    bf16 probabilities, not the pass's: a pass of several rows may be longer than MAX_TOKENS."""
    if (
        module.config._attn_implementation != NAME
        or not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        or hidden_states.dim() != 3
        or hidden_states.shape[0] != 1
        or kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
        or (module.training and module.attention_dropout)
        or module.head_dim % 2
        or position_embeddings is None
        or position_embeddings[0].dtype != torch.float32
        or position_embeddings[0].shape[-2:] != ((length := hidden_states.shape[1]), module.head_dim)
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.shape != (1, 1, length, length)
    ):
        return None
    starts = block_starts(attention_mask)
    if starts is None:
        return None
    longest = longest_row(attention_mask, starts)
    window = getattr(module, "sliding_window", None) or getattr(module.config, "sliding_window", None)
    return None if longest > MAX_TOKENS or (window is not None and longest > window) else starts


def longest_row(attention_mask: torch.Tensor, starts: torch.Tensor) -> int:
    """The most tokens of one row in a packed pass with these first keys (once a pass, `per_mask`)."""
    return per_mask(attention_mask, "longest", lambda: int((torch.arange(len(starts)) - starts).max()) + 1)


AttentionInterface.register(NAME, packed_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks transformers builds itself: SDPA's booleans


def block_causal_mask(rows: torch.Tensor) -> torch.Tensor:
    """The [1, 1, T, T] boolean mask of a packed pass whose token t belongs to row `rows[t]`: each token may
    attend to itself and the earlier tokens of its own row, and to nothing else."""
    causal = torch.ones(len(rows), len(rows), dtype=torch.bool, device=rows.device).tril()
    return ((rows[:, None] == rows[None, :]) & causal)[None, None]


def applies(lm: LM) -> bool:
    """Whether `packed_attention` switches `lm`: a model on a CPU that attends with "sdpa"."""
    return lm.device.type == "cpu" and lm.model.config._attn_implementation == "sdpa"


@contextlib.contextmanager
def packed_attention(lm: LM) -> Iterator[None]:
    """Inside this block a model on a CPU that attends with "sdpa" attends with `packed_attention_forward`;
    any other model or device is left as it is."""
    if not applies(lm):
        yield
        return
    config = lm.model.config
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
