"""Attention for the batched updater's packed training passes on a CPU.

A packed pass lays several rows end to end under a block-diagonal causal mask (`seal.multilora.PackedBatch`).
On a CPU, PyTorch's scaled_dot_product_attention takes such a masked pass through its flash kernel, which
is made for long sequences: at the lengths of SEAL's passes (tens to a few hundred tokens) its backward costs
far more than its arithmetic. Written as batched matrix products instead, with each key/value head's query
heads side by side (grouped-query attention without copying keys and values), the scores in float32 with
the mask added as a bias, then softmax, forward and backward of one SmolLM2 layer in bf16 on one thread of
the 2-core CPU, TCMalloc (`benchmarks/attention_speed.py`) took 0.47 ms against 0.88 at 41 tokens, 2.1
against 3.8-4.0 at 160, 4.8-5.4 against 6.8-7.2 at 256 (and 20 against 25 at 512). Passes longer than
`MAX_TOKENS` go to SDPA: the float32 scores and probabilities kept for backward grow with the square of the
length (about 175 MB a SmolLM2 pass at 256 tokens, 700 MB at 512), for less and less gain.

`packed_attention(lm)` switches a model from transformers' "sdpa" to this implementation for a block (the
batched updater's training on a CPU). Anything that is not a packed pass (a batch of several rows, no mask, a
cache, dropout) goes to SDPA as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from seal.models import LM

NAME = "seal_packed"
MAX_TOKENS = 256  # longer passes go to SDPA
_last_bias = threading.local()  # per thread (lanes train side by side): the last mask's bias


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
    every key/value head's `groups` query heads add to their scores. Every layer of a pass gets the same mask
    tensor, so it is built once a pass on each thread rather than once a layer (not under torch.compile,
    which traces the building into its graph)."""
    key = (attention_mask._version, groups)
    last = getattr(_last_bias, "value", None)
    compiling = torch.compiler.is_compiling()
    if not compiling and last is not None and last[0] is attention_mask and last[1] == key:
        return last[2]
    length = attention_mask.shape[-1]
    bias = torch.zeros(length, length, device=attention_mask.device)
    bias = bias.masked_fill_(~attention_mask[0, 0], -torch.inf).repeat(groups, 1)
    if not compiling:
        _last_bias.value = (attention_mask, key, bias)
    return bias


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
