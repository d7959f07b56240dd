"""Decoding steps of a Llama model whose rows each have their own adapter, written out lean for a CPU.

The batched updater answers every question of K adapters in one generation call. Through transformers'
forward, a decoding step of SmolLM2 with 20 rows took about 110 ms on the 2-core CPU: the adapters' stacked
products as long as the frozen weights' (each slot's A and B a product of its own size), and much of the rest
in dozens of small operations a layer (casts, masks, the cache's concatenations). Here, per decoder layer and
set of adapters, the projections that read the same input are one product: the frozen weights of q, k and v
(or gate and up) and every slot's A matrices stacked under them, laid out once by oneDNN. Their adapters' B
matrices make one more product (block diagonal, the scaling folded in) that adds onto the frozen outputs.
Keys and values go into a cache allocated ahead, attention is PyTorch's SDPA with a boolean mask, and the
norms and SwiGLU are the C++ kernels' nodes under bf16.

Under bf16 on an AVX-512 CPU, with the C++ kernels built, each layer is one call of their `decode_layer`
instead, for the prompt as well as each step: the same products, and the norms, rotary embedding, cache
writes, attention and SwiGLU written out around them; the output projection is laid out by oneDNN. On a CPU
with AVX-512 BF16 and no AMX, the groups and the output projection are laid out by the kernels instead, for
products of their own (seal/kernels/cpu.cpp, "Frozen weights through our own products"; on the AMD EPYC the
bench's evaluation 2.8-3.0 s against 3.1-3.4 s through oneDNN's); there each token's B product reads only its
own slot's columns and the rows of the block-diagonal stack that match them, the same sums without the zeros
(the bench's evaluation 2.27-2.54 s against 2.54-2.96 s). The bench's evaluation (20 answers of 4
adapters) took 3.4-3.5 s on the AMX Xeon against 6.2-6.5 s with PyTorch's operations between the products and
the prompt through transformers' forward (benchmarks/README.md). The first tokens that the prompts of one
slot's rows share (SEAL's questions about one passage share the chat template and the topic) go through the
layers once for the slot, from one of its rows, and are copied into the cache of the others: in the bench, 4 x
34 tokens and then 20 x 31 where the 20 prompts filled 20 x 65 with their padding, its prompts 0.70-0.74 s
against 1.22-1.26 s on the AMD EPYC. Attention sums the weights of the keys a row may attend to packed in key
order, so that the logits are bit for bit those of the prompts computed whole wherever the padding puts a
row's keys. Its rotary embedding and attention compute in float32 where PyTorch's round to bf16 in between, so
greedy answers may differ where two tokens are within bf16 rounding.

`LlamaSteps` has the interface of `seal.models.ModelSteps`; without `decode_layer` the prompt goes through the
model's own forward (one call a batch). The adapters' products run in the compute dtype, as in training (the
transformers path multiplies the stacked adapters in float32), so greedy answers may differ where two tokens
are within bf16 rounding of each other.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.torch_version import TorchVersion

from seal.kernels import lays_out
from seal.models import SILU, ModelSteps


def _packed(weight: torch.Tensor, kernel: Any = None) -> torch.Tensor:
    """`weight` laid out once for its products: by `kernel` where it lays bf16 weights out for products of its
    own (`decode_layer` multiplies by either layout), else by oneDNN."""
    if lays_out(kernel, weight):
        return kernel.laid_weight(weight.contiguous(), False)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


@dataclass
class Group:
    """Adapted projections that read one input, with the adapters of some slots stacked (see module doc)."""

    weight: torch.Tensor  # packed [sum(outs) + len(outs) * width, in]: the frozen weights, then each one's A
    bias: torch.Tensor | None  # [sum(outs) + len(outs) * width]; zero on the A rows
    b: torch.Tensor  # packed [sum(outs), len(outs) * width]: each one's B stack, block diagonal, scaled
    outs: list[int]

    @classmethod
    def of(cls, layers: list[Any], slots: list[int], dtype: torch.dtype, kernel: Any = None) -> Group:
        """The group of `layers` (seal.multilora.MultiLoraLinear) with the adapters of `slots` stacked, laid
        out by `_packed` (with `kernel`, only for its `decode_layer`)."""
        outs = [layer.base_layer.out_features for layer in layers]
        frozen = [layer.base_layer.weight.detach() for layer in layers]
        rank = layers[0].lora_A[slots[0]].shape[0]
        width = rank * len(slots)
        # Each copied once, cast on the way: the frozen weights, then each one's A matrices (one per slot).
        pieces = frozen + [layer.lora_A[s].detach() for layer in layers for s in slots]
        stacked = frozen[0].new_empty(sum(outs) + len(layers) * width, frozen[0].shape[1], dtype=dtype)
        row = 0
        for piece in pieces:
            stacked[row : row + len(piece)] = piece
            row += len(piece)
        b = frozen[0].new_zeros(sum(outs), len(layers) * width, dtype=dtype)
        row = 0
        for i, layer in enumerate(layers):
            for j, s in enumerate(slots):
                columns = slice(i * width + j * rank, i * width + (j + 1) * rank)
                b[row : row + outs[i], columns] = layer.lora_B[s].detach() * layer.scaling
            row += outs[i]
        bias = None
        if any(layer.base_layer.bias is not None for layer in layers):
            parts = [
                layer.base_layer.bias.detach() if layer.base_layer.bias is not None else f.new_zeros(len(f))
                for layer, f in zip(layers, frozen, strict=True)
            ]
            bias = torch.cat([*parts, frozen[0].new_zeros(len(layers) * width)]).to(dtype)
        return cls(_packed(stacked, kernel), bias, _packed(b, kernel), outs)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Each projection of `x` [rows, in] with its row's adapter; `mask` [rows, width] is 1 on the row's
        slot's columns, 0 elsewhere (all 0: the base model)."""
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], None)
        frozen = sum(self.outs)
        hidden = y[:, frozen:].view(len(x), len(self.outs), -1).mul(mask[:, None, :]).view(len(x), -1)
        out = torch.ops.mkldnn._linear_pointwise.binary(hidden, y[:, :frozen], self.b, None, "add")
        return list(out.split(self.outs, dim=1))


@dataclass
class LayerGroups:
    qkv: Group
    o: Group
    gate_up: Group
    down: Group

    def all(self) -> tuple[Group, Group, Group, Group]:
        return self.qkv, self.o, self.gate_up, self.down


def adapted_llama_layers(model: nn.Module) -> list[nn.Module] | None:
    """The decoder layers of a Llama model whose seven projections all carry the batched updater's
    adapters (`lora_A`), their MLP SiLU-gated; None for any other model."""
    if model.config.model_type != "llama" or not hasattr(model.model, "rotary_emb"):
        return None
    layers = list(model.model.layers)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [getattr(attn, f"{n}_proj", None) for n in "qkvo"]
        projections += [getattr(mlp, f"{n}_proj", None) for n in ("gate", "up", "down")]
        if not all(hasattr(p, "lora_A") for p in projections):
            return None
        if type(mlp.act_fn).__name__ not in SILU or not hasattr(attn, "scaling"):
            return None
    return layers


def _projections(layers: list[nn.Module]) -> list[nn.Module]:
    """The seven adapted projections of each of `layers` (as `adapted_llama_layers` returns them)."""
    projections = [getattr(layer.self_attn, f"{n}_proj") for layer in layers for n in "qkvo"]
    return projections + [getattr(layer.mlp, f"{n}_proj") for layer in layers for n in ("gate", "up", "down")]


def fits(lm: Any) -> bool:
    """Whether `LlamaSteps` can decode for `lm`: a Llama model with every projection adapted, its frozen
    weights and output projection float32 (the steps compute in float32 where there is no autocast) and the
    output projection a plain linear layer (not adapted), on an x86 CPU whose torch (2.5 or later) has
    oneDNN's packed products."""
    if not (
        lm.device.type == "cpu"
        and platform.machine() in ("x86_64", "AMD64")
        and TorchVersion(torch.__version__) >= "2.5"  # scaled_dot_product_attention's enable_gqa
        and torch.backends.mkldnn.is_available()
    ):
        return False
    layers = adapted_llama_layers(lm.model)
    if not layers or type(lm.model.lm_head) is not nn.Linear:
        return False
    weights = [lm.model.lm_head.weight] + [p.base_layer.weight for p in _projections(layers)]
    return all(weight.dtype == torch.float32 for weight in weights)


def fused(lm: Any, kernel: Any) -> bool:
    """Whether `LlamaSteps` computes each layer through `kernel`'s `decode_layer`: a model that `fits`
    computing in bf16, with the kernels' AVX-512 nodes (`kernel`, as LlamaSteps gets it), no biases, head and
    hidden sizes multiples of 16 and one epsilon for both norms of a layer."""
    if kernel is None or lm.autocast_dtype != torch.bfloat16 or not fits(lm):
        return False
    layers = adapted_llama_layers(lm.model)
    return (
        layers[0].self_attn.head_dim % 16 == 0
        and lm.model.config.hidden_size % 16 == 0
        and all(p.base_layer.bias is None for p in _projections(layers))
        and lm.model.lm_head.bias is None
        and all(
            layer.input_layernorm.variance_epsilon == layer.post_attention_layernorm.variance_epsilon
            for layer in layers
        )
    )


def stacked_groups(
    model: nn.Module, slots: list[int], dtype: torch.dtype, kernel: Any = None
) -> list[LayerGroups]:
    """Each decoder layer's groups with the adapters of `slots` stacked (`kernel`: for its `decode_layer`)."""
    out = []
    for layer in adapted_llama_layers(model) or []:
        attn, mlp = layer.self_attn, layer.mlp
        out.append(
            LayerGroups(
                Group.of([attn.q_proj, attn.k_proj, attn.v_proj], slots, dtype, kernel),
                Group.of([attn.o_proj], slots, dtype, kernel),
                Group.of([mlp.gate_proj, mlp.up_proj], slots, dtype, kernel),
                Group.of([mlp.down_proj], slots, dtype, kernel),
            )
        )
    return out


class LlamaSteps:
    """Decoding steps as `seal.models.ModelSteps` computes them, row i through the adapter in slot
    `row_slots[i]` (-1: the base model alone). `groups` are the layers' groups with the adapters of the slots
    in use stacked in ascending order (`stacked_groups`); `kernel`, where training uses the kernels' AVX-512
    nodes under bf16 (`seal.multilora.avx512_nodes`), computes whole layers (`decode_layer`, where the model
    has no biases and its head and hidden sizes are multiples of 16) or the norms and SwiGLU, else PyTorch
    does."""

    def __init__(
        self, lm: Any, rank: int, row_slots: list[int], groups: list[LayerGroups], kernel: Any = None
    ):
        self.lm, self.model, self.weights = lm, lm.model, groups
        self.layers = adapted_llama_layers(lm.model) or []
        self.dtype = lm.autocast_dtype or torch.float32
        self.kernel = kernel
        config = lm.model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        self.fused = fused(lm, kernel)  # each layer one call of the kernels' `decode_layer`
        # Its output projection laid out by oneDNN too (about 10 ms): at 5-20 rows the plain product read the
        # weight at about half the speed.
        self.head = _packed(self.model.lm_head.weight.detach().to(self.dtype), kernel) if self.fused else None
        self.row_slots = list(row_slots)
        slots = sorted({s for s in row_slots if s >= 0})
        self.mask = torch.zeros(len(row_slots), len(slots) * rank, dtype=self.dtype, device=lm.device)
        for row, slot in enumerate(row_slots):
            if slot >= 0:
                at = slots.index(slot) * rank
                self.mask[row, at : at + rank] = 1

    def start(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows, self.length = input_ids.shape
        self.last = positions[:, -1]
        if self.fused:  # the prompt through `decode_layer`, into a cache with room for 64 steps
            shape = (rows, self.kv_heads, self.length + 64, self.head_dim)
            self.keys = [input_ids.new_empty(shape, dtype=self.dtype) for _ in self.layers]
            self.values = [input_ids.new_empty(shape, dtype=self.dtype) for _ in self.layers]
            self._allow(mask)
            shared = self._shared_prefix(input_ids, mask)
            if shared:  # computed once a slot into the cache's first positions; then each row's own tokens
                self._prefill_prefix(input_ids, mask, shared)
                input_ids, positions = input_ids[:, shared:], positions[:, shared:]
            x = self._fused_layers(input_ids, positions, shared)
            return self._logits(x.view(rows, input_ids.shape[1], -1)[:, -1])
        prompt = ModelSteps(self.lm)  # the prompt through the model's own forward
        logits = prompt.start(input_ids, mask, positions)
        layers = _cached(prompt.cache)
        self.keys = [self._buffer(keys) for keys, _ in layers]
        self.values = [self._buffer(values) for _, values in layers]
        self._allow(mask)
        return logits

    def _shared_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor) -> int:
        """How many first tokens every row's prompt shares with the other rows of its slot (0 where that is
        under MIN_SHARED, or no slot has two rows); at least one token of each prompt is left."""
        lengths = mask.sum(-1).tolist()
        if len(set(self.row_slots)) == len(self.row_slots) or min(lengths) <= MIN_SHARED:
            return 0
        prompts = [row[len(row) - n :] for row, n in zip(input_ids.tolist(), lengths, strict=True)]
        first = {slot: prompts[self.row_slots.index(slot)] for slot in set(self.row_slots)}
        shared = min(lengths) - 1
        for slot, prompt in zip(self.row_slots, prompts, strict=True):
            same = [a == b for a, b in zip(prompt[:shared], first[slot], strict=False)]
            shared = same.index(False) if False in same else shared
        return shared if shared >= MIN_SHARED else 0

    def _prefill_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor, shared: int) -> None:
        """The first `shared` tokens of each slot's prompts through the layers once, from one of its rows,
        their keys and values copied into the cache's first `shared` positions of every row of the slot; the
        rows' padding moves after them (the rows keep their positions, so attention sees what it saw)."""
        slots = sorted(set(self.row_slots))
        one = [self.row_slots.index(slot) for slot in slots]  # a row of each slot
        pad = (mask.shape[1] - mask.sum(-1)).tolist()
        prefix = torch.stack([input_ids[row, pad[row] : pad[row] + shared] for row in one])
        positions = torch.arange(shared, device=input_ids.device).expand(len(one), shared)
        shape = (len(one), self.kv_heads, shared, self.head_dim)
        keys = [input_ids.new_empty(shape, dtype=self.dtype) for _ in self.layers]
        values = [input_ids.new_empty(shape, dtype=self.dtype) for _ in self.layers]
        allowed = torch.ones(len(one), shared, dtype=torch.bool, device=input_ids.device)
        self._fused_layers(prefix, positions, 0, (keys, values, allowed, self.mask[one]))
        of_row = torch.tensor([slots.index(slot) for slot in self.row_slots], device=input_ids.device)
        for i in range(len(self.layers)):
            self.keys[i][:, :, :shared] = keys[i][of_row]
            self.values[i][:, :, :shared] = values[i][of_row]
        self.allowed[:, :shared] = True
        for row, n in enumerate(pad):  # the prompt's own tokens stay where they were; before them, padding
            self.allowed[row, shared : shared + n] = False

    def _allow(self, mask: torch.Tensor) -> None:
        """Where each row may attend: not its padding, nor the cache not yet written."""
        self.allowed = torch.zeros(len(mask), self.keys[0].shape[2], dtype=torch.bool, device=mask.device)
        self.allowed[:, : self.length] = mask.bool()

    def _fused_layers(
        self, tokens: torch.Tensor, positions: torch.Tensor, t: int, cache: tuple | None = None
    ) -> torch.Tensor:
        """The residual stream [rows x n, hidden] after every layer for `tokens` [rows, n] at `positions`,
        their keys and values written into the cache from position `t` (`decode_layer`); `cache`: keys,
        values, allowed and mask for other rows than the steps' own."""
        keys, values, allowed, mask = cache or (self.keys, self.values, self.allowed, self.mask)
        x = self.model.model.embed_tokens(tokens).float()
        cos, sin = self.model.model.rotary_emb(x, positions)
        x, cos, sin = (v.reshape(-1, v.shape[-1]).contiguous() for v in (x, cos, sin))
        for i, (layer, groups) in enumerate(zip(self.layers, self.weights, strict=True)):
            x = self.kernel.decode_layer(
                x,
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
                layer.input_layernorm.variance_epsilon,
                [tensor for group in groups.all() for tensor in (group.weight, group.b)],
                mask,
                cos,
                sin,
                keys[i],
                values[i],
                allowed,
                t,
                self.heads,
                self.scaling,
            )
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        normed = self._norm(self.model.model.norm, x)
        if self.head is not None and self.head.dim() == 1:  # laid out by the kernel
            return self.kernel.laid_product(normed.contiguous(), self.head).float()
        if self.head is not None:
            return torch.ops.mkldnn._linear_pointwise(normed, self.head, None, "none", [], None).float()
        return self.model.lm_head(normed).float()

    def _buffer(self, states: torch.Tensor, room: int = 64) -> torch.Tensor:
        """`states` [rows, kv_heads, length, head_dim] at the start of a cache with `room` more positions."""
        rows, heads, length, width = states.shape
        buffer = states.new_empty(rows, heads, length + room, width, dtype=self.dtype)
        buffer[:, :, :length] = states
        return buffer

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.allowed, self.mask, self.last = self.allowed[rows], self.mask[rows], self.last[rows]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.length
        if t == self.keys[0].shape[2]:  # the cache is full: room for as many positions again
            self.keys = [self._buffer(k, t) for k in self.keys]
            self.values = [self._buffer(v, t) for v in self.values]
            self.allowed = torch.cat([self.allowed, torch.zeros_like(self.allowed)], dim=1)
        self.allowed[:, t] = True
        self.last = self.last + 1
        self.length = t + 1
        if self.fused:
            return self._logits(self._fused_layers(tokens[:, None], self.last[:, None], t))
        x = self.model.model.embed_tokens(tokens).float()
        cos, sin = self.model.model.rotary_emb(x, self.last[:, None])
        rows, width = len(tokens), self.head_dim
        cos, sin = cos.to(self.dtype).view(rows, 1, width), sin.to(self.dtype).view(rows, 1, width)
        allowed = self.allowed[:, None, None, : t + 1]
        heads, kv_heads = self.heads, self.kv_heads
        for i, (layer, groups) in enumerate(zip(self.layers, self.weights, strict=True)):
            q, k, v = groups.qkv(self._norm(layer.input_layernorm, x), self.mask)
            qk = _rotated(torch.cat([q, k], dim=1).view(rows, heads + kv_heads, width), cos, sin)
            self.keys[i][:, :, t] = qk[:, heads:]
            self.values[i][:, :, t] = v.view(rows, kv_heads, width)
            keys, values = self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1]
            attended = nn.functional.scaled_dot_product_attention(
                qk[:, :heads, None], keys, values, attn_mask=allowed, scale=self.scaling, enable_gqa=True
            )
            x = x + groups.o(attended.view(rows, -1), self.mask)[0]
            gate, up = groups.gate_up(self._norm(layer.post_attention_layernorm, x), self.mask)
            x = x + groups.down(self._swiglu(gate, up), self.mask)[0]
        return self._logits(x)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.rms_norm(x, norm.weight, norm.variance_epsilon)
        return norm(x).to(self.dtype)

    def _swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.swiglu(gate, up)
        return nn.functional.silu(gate) * up


# The fewest first tokens of a prompt that `LlamaSteps` computes once for all rows of a slot sharing them.
MIN_SHARED = 8


def _cached(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values in a transformers cache, [rows, kv_heads, length, head_dim]."""
    if hasattr(cache, "layers"):  # transformers 4.56 and later
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of `x` [rows, heads, width] at the rows' positions (cos, sin [rows, 1, width])."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
