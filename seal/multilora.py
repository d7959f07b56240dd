"""The inner loop, batched: K LoRA adapters trained together, sharing every forward/backward pass.

SEAL trains one throw-away adapter per self-edit, and each is small: training them one after another leaves
the hardware mostly idle. Here every targeted linear layer holds K adapter slots side by side, and each token
of a batch says which slot it uses, so K jobs share every forward and backward pass. Each adapter's loss is
the mean over its own tokens and the total is their sum, so each adapter gets exactly the gradient it would
get alone, and each slot has its own AdamW. The result matches `seal.adapt.LoraUpdater` job for job (same
initialisation, data order and optimiser), up to float rounding. When a job ends, its slot takes the next.

A step's rows are packed end to end rather than padded to the longest: SEAL mixes a ~200-token passage with
~20-token self-edit lines, so padding every row to the passage's length would spend most of the compute on
padding. A block-diagonal causal mask and positions that restart at 0 for each row keep every row's
activations exactly what they would be alone. The packed sequences of a step (at most `adapt.pack_length`
tokens each) go through forward and backward one after another, their gradients adding up, so the
activations held at any time are one sequence's whatever the number of adapters: each more adapter costs its
own weights, gradients and optimiser state, not more activations. The loss goes through the output
projection a chunk of tokens at a time, so the full logits (50k per token) are never held whole.

On a CPU the slots and jobs are split into lanes (`adapt.lanes`): threads that each train their own jobs in
their own slots as described, single-threaded, side by side on the one model. A small model's pass does not
keep several cores busy; several passes at once do. Each lane holds one pass's activations, and the lanes
share a budget of them (`adapt.lane_budget`, seal/lane_budget.py) so that their peaks do not coincide. Under
bf16 autocast on an AVX-512 CPU a Llama-style model's pass calls each decoder layer's C++ nodes one after
another (`packed_layers`) rather than through the modules' forwards.

The same slots, given per row, let one `generate` call serve prompts that each need a different adapter;
on a CPU its passes go through the same C++ kernel, without autograd.
Adapter weights use PEFT's state-dict keys, so adapters from either updater can be applied by the other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import psutil
import torch
from torch import nn
from tqdm import tqdm

from seal import allocator, attention, decoding, lane_budget
from seal.adapt import (
    Row,
    SharedCountAdamW,
    TrainedAdapter,
    UpdateJob,
    UpdateResult,
    batched_adamw,
    check_applicable,
    checkpointing,
    merge_lora,
    no_rows,
    tokenize,
)
from seal.config import AdaptConfig
from seal.kernels import cpu_kernels, lays_out
from seal.memory import out_of_memory
from seal.models import (
    LM,
    PACKABLE_ATTENTION,
    SILU,
    ModelSteps,
    continuation_logprobs,
    generate,
    output_projection,
)

PEFT_PREFIX = "base_model.model."  # where PEFT's wrapper puts the model in its state-dict keys
log = logging.getLogger(__name__)
MB = 1024 * 1024
NO_TARGET = -100  # a packed token with nothing to predict (before a row's first learnt token)
STACKED_ROWS = 16  # decoding: runs of at most this many rows a slot go through the stacked adapters


class AdapterRouting:
    """Which adapter slot each row, or each token, of the next forward pass uses. One instance is shared by
    all the MultiLoraLinear layers of a model, so the owner sets it once per forward and the routing is
    worked out once, not once per layer. Two ways to apply it (`adapt.lora_routing`):

    - runs: the rows or tokens as runs of consecutive ones with the same slot, each run through its own
      adapter. Callers lay their input out so that each slot's rows or tokens are consecutive (a packed row
      is; generation batches are sorted by adapter), so there are about as many runs as slots, and no token
      is gathered or scattered. No compute is spent on another slot's adapter, but each slot costs its own
      small matrix products in every layer.
    - mask: every row or token through all the slots in use at once, their A matrices stacked, then each
      row's or token's columns of the other slots set to zero by `mask` before the stacked B. Two matrix
      products per layer whatever the number of slots, for (slots - 1) x the adapters' own compute: fewer,
      larger operations where each one has a fixed cost (kernel launches on a GPU).

    A lane of MultiLoraUpdater.train (a thread training its own slots) routes its passes with a routing of its
    own (`lane`); every other thread, the autograd engine's included, uses this shared one.

    While `stacked` is set (the updater's decoding through the C++ kernel), runs of at most STACKED_ROWS
    get the mask as well: the kernel takes a decoding step's rows, one token each, through the stacked
    adapters."""

    def __init__(self, by_mask: bool = False, rank: int = 0) -> None:
        self.by_mask, self.rank = by_mask, rank
        self.stacked = False
        self.per_token = False  # True: rows or tokens count tokens of the flattened batch; False: rows
        self.runs: list[tuple[int, int]] = []  # (slot, length); slot -1 is the base model alone
        self.slots: list[int] = []  # mask: the slots in use, in the order of their stacked columns
        self.mask: torch.Tensor | None = None  # mask: 1 on each row's or token's own slot's columns, else 0
        self._lanes = threading.local()

    def current(self) -> AdapterRouting:
        """The routing of the calling thread: its lane's own inside `lane`, else this one."""
        return getattr(self._lanes, "routing", self)

    @contextlib.contextmanager
    def lane(self) -> Iterator[None]:
        """Inside this block the calling thread routes with a routing of its own."""
        self._lanes.routing = AdapterRouting(self.by_mask, self.rank)
        try:
            yield
        finally:
            del self._lanes.routing

    def adapter_runs(self, tokens: int = 1) -> tuple[list[int], list[int], list[int]]:
        """The runs that go through an adapter, as the C++ kernel takes them: each one's first row, its
        number of rows (`tokens` rows of the input for each row or token the routing counts), and its slot."""
        starts, lengths, slots = [], [], []
        offset = 0
        for slot, n in self.runs:
            if slot >= 0:
                starts.append(offset)
                lengths.append(n * tokens)
                slots.append(slot)
            offset += n * tokens
        return starts, lengths, slots

    def set(self, ids: torch.Tensor | None) -> None:
        """`ids` of shape [batch] gives each row's slot, [batch, length] each token's; -1 is the base model
        alone, and None means every row uses the base model."""
        self.runs, self.slots, self.mask = [], [], None
        if ids is None or bool((ids < 0).all()):
            return
        self.per_token = ids.dim() == 2
        slots, counts = torch.unique_consecutive(ids.flatten(), return_counts=True)
        self.runs = list(zip(slots.tolist(), counts.tolist(), strict=True))
        if self.by_mask or (self.stacked and max(n for _, n in self.runs) <= STACKED_ROWS):
            self.slots = sorted({slot for slot, _ in self.runs if slot >= 0})
            own = ids.flatten()[:, None] == torch.tensor(self.slots, device=ids.device)
            mask = own.float().repeat_interleave(self.rank, dim=1)  # [rows or tokens, slots x rank]
            self.mask = mask if self.per_token else mask[:, None, :]  # rows: the same for each position


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus `capacity` LoRA adapters; each routed row or token goes through the adapter
    of its slot: base(x) + scaling * B[slot] A[slot] x, as PEFT computes one adapter. Each slot has its own
    parameters, so a backward pass makes gradients only for the slots it used."""

    def __init__(self, base: nn.Linear, capacity: int, cfg: AdaptConfig, routing: AdapterRouting):
        super().__init__()
        self.base_layer, self.routing = base, routing
        device, out_features = base.weight.device, base.out_features
        # float32 whatever the base dtype, as PEFT keeps adapters (its autocast_adapter_dtype default).
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(cfg.rank, base.in_features, device=device)) for _ in range(capacity)
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(out_features, cfg.rank, device=device)) for _ in range(capacity)
        )
        # Each slot's (A, B), the same parameters: read by every pass, where indexing a ParameterList costs a
        # string conversion and an attribute lookup each time (the slots' tensors only change in place).
        self.slot_weights = tuple(zip(self.lora_A, self.lora_B, strict=True))
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # While MultiLoraUpdater.train runs the C++ kernel: the kernel and the frozen tensors it multiplies by
        # ([weight, bias] in the compute dtype, then oneDNN's packed weight and its transpose if any).
        # Otherwise None: PyTorch's operations below.
        self.kernel: Any = None
        self.kernel_frozen: list[torch.Tensor] = []
        # Decoding through the kernel: the adapters of these slots stacked as A [slots x rank, in] and B [out,
        # slots x rank], made once per set of slots; emptied whenever a slot is loaded.
        self.stacks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing.current()
        if self.kernel is not None and routing.runs and not routing.by_mask:
            return self._kernel_forward(x, routing)
        result = self.base_layer(x)
        if not routing.runs:
            return result
        # Dim 0 of this view is what the routing counts: tokens of the flattened batch, or whole rows.
        inputs = x.flatten(0, -2) if routing.per_token else x
        if routing.by_mask:
            if len(routing.slots) == 1:  # no stack to build: cat would copy the lone slot's matrices
                a, b = self.lora_A[routing.slots[0]], self.lora_B[routing.slots[0]]
            else:
                a = torch.cat([self.lora_A[slot] for slot in routing.slots])
                b = torch.cat([self.lora_B[slot] for slot in routing.slots], dim=1)
            hidden = nn.functional.linear(self._adapter_input(inputs, a.dtype), a) * routing.mask
            delta = nn.functional.linear(hidden, b) * self.scaling
            return (result + delta.view(*result.shape[:-1], -1)).to(result.dtype)
        counts = [n for _, n in routing.runs]
        deltas = []
        for (slot, _), part in zip(routing.runs, inputs.split(counts), strict=True):
            if slot < 0:
                deltas.append(part.new_zeros(*part.shape[:-1], result.shape[-1]))
            else:
                part = self._adapter_input(part, self.lora_A[slot].dtype)
                deltas.append(part @ self.lora_A[slot].T @ self.lora_B[slot].T)
        delta = (deltas[0] if len(deltas) == 1 else torch.cat(deltas)) * self.scaling
        return (result + delta.view(*result.shape[:-1], -1)).to(result.dtype)

    def _kernel_forward(self, x: torch.Tensor, routing: AdapterRouting) -> torch.Tensor:
        """The forward above, routed by runs, as one node of the C++ kernel (seal/kernels/cpu.cpp); a
        decoding step of a few rows a slot, with `routing.stacked`, through the slots' stacked adapters."""
        tokens = 1 if routing.per_token else x[0].numel() // x.shape[-1]  # flattened rows in a routed row
        if routing.mask is not None and tokens == 1:
            slots = tuple(routing.slots)
            if slots not in self.stacks:
                a = torch.cat([self.lora_A[slot].detach() for slot in slots])
                self.stacks[slots] = a, torch.cat([self.lora_B[slot].detach() for slot in slots], dim=1)
            a, b = self.stacks[slots]
            return self.kernel.lora_linear_stacked(x, self.kernel_frozen, a, b, routing.mask, self.scaling)
        starts, lengths, slots = routing.adapter_runs(tokens)
        a, b = self.adapters(slots)
        return self.kernel.lora_linear(x, self.kernel_frozen, a, b, starts, lengths, self.scaling)

    def adapters(self, slots: list[int]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The A and the B matrices of `slots`, in order: the lists the kernel's `lora_linear` takes."""
        return [self.slot_weights[s][0] for s in slots], [self.slot_weights[s][1] for s in slots]

    def _adapter_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` as the adapters read it: cast to their dtype, as PEFT casts it, then dropout. Under autocast
        without dropout the cast is left out: autocast casts it to its own dtype for the product anyway, and a
        bf16 or float16 input cast to float32 and back is unchanged (and so is its gradient, the other way),
        so the pass computes the same numbers with two copies fewer per adapter and layer."""
        if isinstance(self.dropout, nn.Identity) and torch.is_autocast_enabled(x.device.type):
            return x
        return self.dropout(x.to(dtype))


def pack(lengths: list[int], pack_length: int) -> list[list[int]]:
    """The indices of `lengths` in bins of at most `pack_length` tokens. Each bin is one forward/backward
    pass: a plan's peak memory is its fullest bin's, and each pass has a fixed cost, so the plan is scored
    by (bins x fullest bin) tokens: few bins are not enough, they must also be evenly filled. First-fit
    decreasing finds few bins but leaves the last ones nearly empty; spreading the rows, longest first, each
    onto the emptiest of the fewest bins that hold them balances them but may need a bin more. Both are
    tried and the cheaper plan is kept."""
    if any(n > pack_length for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit in pack_length={pack_length}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    first_fit: list[list[int]] = []
    room: list[int] = []
    for i in order:
        b = next((b for b, left in enumerate(room) if left >= lengths[i]), len(first_fit))
        if b == len(first_fit):
            first_fit.append([])
            room.append(pack_length)
        first_fit[b].append(i)
        room[b] -= lengths[i]
    plans = [first_fit]
    for count in range(max(1, -(-sum(lengths) // pack_length)), len(lengths) + 1):
        spread: list[list[int]] = [[] for _ in range(count)]
        loads = [0] * count
        for i in order:
            b = loads.index(min(loads))
            spread[b].append(i)
            loads[b] += lengths[i]
        if max(loads) <= pack_length:  # true at the latest with one row a bin
            plans.append(spread)
            break

    def cost(bins: list[list[int]]) -> tuple[int, int]:
        return len(bins) * max((sum(lengths[i] for i in members) for members in bins), default=0), len(bins)

    return min(plans, key=cost)


def balanced(costs: list[float], groups: int) -> list[list[int]]:
    """The indices of `costs` in `groups` groups of about equal total cost, each ascending: the costliest
    first, each to the group with the least so far (ties: the first such group)."""
    members: list[list[int]] = [[] for _ in range(groups)]
    load = [0.0] * groups
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        lightest = load.index(min(load))
        members[lightest].append(i)
        load[lightest] += costs[i]
    return [sorted(group) for group in members]


# Fixed costs in tokens' worth, for predicting the lanes' time (`lane_rounds`). On one thread of the 2-core
# CPU a SmolLM2 token cost about 1.9 ms, a pass about 100 ms more (the frozen weights read, the layers' calls)
# and each job's step in it about 65 ms more (its adapters' casts and small products, AdamW).
PASS_TOKENS = 50
STEP_TOKENS = 35


def lane_rounds(jobs: list[list[list[int]]], slots: int, pack_length: int) -> list[int]:
    """The predicted cost, in tokens' worth, of each round of a lane (each `_step`, where every running job
    steps once): its jobs, each given as its steps' rows' fed tokens, start in order as slots free up, and a
    round's rows are packed as `pack_rows` packs them, each pass costing PASS_TOKENS more than its tokens and
    each job's step STEP_TOKENS more."""
    queue, running, costs = deque(jobs), [], []
    while queue or running:
        while queue and len(running) < slots:
            job = queue.popleft()
            if job:
                running.append((job, 0))
        if not running:
            break
        lengths = [n for job, done in running for n in job[done]]
        short = [n for n in lengths if n <= pack_length]
        passes = len(lengths) - len(short) + len(pack(short, pack_length))
        costs.append(sum(lengths) + PASS_TOKENS * passes + STEP_TOKENS * len(running))
        running = [(job, done + 1) for job, done in running if done + 1 < len(job)]
    return costs


@dataclass
class PackedBatch:
    """Some of a step's rows laid end to end in one sequence of T tokens, with no padding."""

    ids: torch.Tensor  # [1, T] token ids
    positions: torch.Tensor  # [1, T] each token's position in its own row, so RoPE sees the row alone
    slots: torch.Tensor  # [1, T] each token's adapter slot
    targets: torch.Tensor  # [1, T] the next token of the same row; NO_TARGET before its first learnt one
    attention_mask: torch.Tensor  # [1, 1, T, T] causal within a row, nothing across rows
    present: list[int]  # the slots of its rows, ascending


def pack_rows(rows: list[Row], row_slots: list[int], lm: LM, pack_length: int) -> list[PackedBatch]:
    """Pack `rows` (row i trains slot row_slots[i]) into sequences of at most `pack_length` tokens, a longer
    row alone in its own, in the attention-mask format of `lm`'s attention implementation.

    A row's last token is left out: it predicts nothing, and under a causal mask no other token reads it, so
    every loss and gradient is the same without it (one token in 15 for a self-edit line of 15 tokens). A row
    with no target is left out whole, for the same reason."""
    fed = fed_tokens(rows)
    long = [[i] for i, n in fed.items() if n > pack_length]
    short = [i for i, n in fed.items() if n <= pack_length]
    bins = long + [[short[j] for j in members] for members in pack([fed[i] for i in short], pack_length)]
    return [_packed([rows[i] for i in members], [row_slots[i] for i in members], lm) for members in bins]


def fed_tokens(rows: list[Row]) -> dict[int, int]:
    """The tokens each row reads in a pass, by index: all but its last; a row with no target not at all
    (`pack_rows`)."""
    return {i: len(row.ids) - 1 for i, row in enumerate(rows) if row.targets}


def _packed(rows: list[Row], row_slots: list[int], lm: LM) -> PackedBatch:
    """`rows` end to end in one sequence, each slot's rows side by side (one routing run per slot), each
    without its last token."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    targets: list[int] = []
    segments: list[int] = []  # which row each token belongs to
    for i in sorted(range(len(rows)), key=lambda i: row_slots[i]):
        row, learn = rows[i].ids, rows[i].learn_from
        n = len(row) - 1
        ids += row[:n]
        positions += range(n)
        slots += [row_slots[i]] * n
        # Token t predicts token t + 1 of its row, from the first learnt one on.
        targets += [NO_TARGET] * (learn - 1) + row[learn:]
        segments += [i] * n
    device = lm.device
    allowed = attention.block_causal_mask(torch.tensor(segments, device=device))
    mask = allowed
    if lm.model.config._attn_implementation == "eager":  # eager adds the mask to the attention scores
        dtype = lm.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return PackedBatch(
        ids=torch.tensor([ids], device=device),
        positions=torch.tensor([positions], device=device),
        slots=torch.tensor([slots], device=device),
        targets=torch.tensor([targets], device=device),
        attention_mask=mask,
        present=sorted(set(row_slots)),
    )


class TokenLosses(torch.autograd.Function):
    """Next-token cross-entropy of each row of `hidden` through a frozen output projection `weight`, a chunk
    of tokens at a time, so the [tokens, vocabulary] logits (50k wide for SmolLM2) never exist whole.
    The loss's gradient with respect to `hidden`, (softmax - onehot) @ weight, is computed in the same pass
    and scaled in backward by each token's incoming gradient: the same FLOPs as autograd, a fraction of the
    memory. A token whose incoming gradient is zero gets exactly zero, even if its loss is not finite.
    With `kernel` (seal/kernels/cpu.cpp) and the projection's `frozen` tensors (`kernel_tensors`, as an
    adapted layer's) the forward runs in C++, each row's softmax in the core's cache."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        kernel: Any = None,
        frozen: list[torch.Tensor] | None = None,
    ):
        if kernel is not None:
            losses, grads = kernel.token_losses(hidden, frozen, targets, chunk)
            ctx.save_for_backward(grads)
            return losses
        losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        grads = torch.empty_like(hidden)
        for start in range(0, len(hidden), chunk):
            part = slice(start, start + chunk)
            logits = (hidden[part] @ weight.T).float()
            target = targets[part]
            log_z = logits.logsumexp(-1)
            losses[part] = log_z - logits.gather(1, target[:, None]).squeeze(1)
            probs = logits.sub_(log_z[:, None]).exp_()
            probs[torch.arange(len(target), device=probs.device), target] -= 1
            grads[part] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grads)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grads,) = ctx.saved_tensors
        scale = grad_losses[:, None].to(grads.dtype)
        return torch.where(scale != 0, grads * scale, 0), None, None, None, None, None


def token_losses(
    lm: LM,
    inputs: dict[str, torch.Tensor],
    keep: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 256,
    kernel: Any = None,
    frozen: list[torch.Tensor] | None = None,
    layers: Callable[[dict[str, torch.Tensor]], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Cross-entropy per kept token of the pass of `inputs` (the model's keyword arguments; `keep` [1, T]
    picks the tokens) against `targets` [kept tokens]. A plain causal LM (`output_projection`): its last
    hidden state through the frozen projection a chunk at a time, in C++ with `kernel` and `frozen` (see
    TokenLosses); its last hidden state from `layers(inputs)` if that gives one (`packed_layers`), else
    from the model's forward. Any other model: its own logits (soft-capped, scaled...), every position's at
    once."""
    head = output_projection(lm.model)
    if head is None:
        logits = lm.model(**inputs).logits[keep]
        return nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    hidden = layers(inputs) if layers is not None else None
    if hidden is None:
        hidden = lm.model.base_model(**inputs).last_hidden_state
    hidden = hidden[keep]
    if head.weight.requires_grad:
        return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    if kernel is not None and frozen is not None:
        return TokenLosses.apply(hidden, frozen[0], targets, chunk, kernel, frozen)
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):
        weight = lm.casts.get(head, weight)  # inside LM.frozen_casts: cast once already
    return TokenLosses.apply(hidden, weight, targets, chunk)


def adapter_losses(losses: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per slot, the sum of its tokens' `losses` divided by `counts[slot]`, its tokens in the whole step: over
    a step's passes these add up to the mean of each adapter's tokens, as PEFT computes it alone (NaN for a
    slot with no tokens, as PEFT's mean over nothing). Callers only read the slots of their tokens."""
    return losses.new_zeros(len(counts)).index_add(0, slots, losses) / counts


@dataclass
class _Step:
    """One optimiser step of one job: the sequences it trains on and where it sits in the job's loop."""

    epoch: int
    offset: int  # index of the step's first sequence in the epoch's shuffled order (LoraUpdater's `step`)
    rows: list[Row]
    ends_epoch: bool


@dataclass
class _Running:
    """A job training in a slot."""

    index: int  # the job's position in the list given to `train`
    plan: list[_Step]
    optimizer: SharedCountAdamW | torch.optim.Optimizer
    result: UpdateResult
    started: float
    done: int = 0  # steps taken
    losses: list[float] = field(default_factory=list)  # this epoch's step losses


class MultiLoraUpdater:
    def __init__(self, lm: LM, cfg: AdaptConfig, capacity: int):
        """Replace the `cfg.target_modules` linear layers of `lm.model` in place with `capacity`-slot
        MultiLoraLinear layers. The base weights are frozen; only `merge` and the outer loop
        (`seal.rl.copy_base_weights`) change them.

        Training packs each step's rows into passes of at most `cfg.pack_length` tokens (a longer row
        alone); `for_device` chooses it and the routing where the config says auto."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        implementation = lm.model.config._attn_implementation
        if implementation not in PACKABLE_ATTENTION:
            raise ValueError(
                f"packed training needs model.attn_implementation in {PACKABLE_ATTENTION}, "
                f"got {implementation!r}"
            )
        if cfg.compile and cfg.gradient_checkpointing:
            raise ValueError(
                "adapt.compile and adapt.gradient_checkpointing do not combine: torch's checkpoint runs the "
                "layers with the compiler turned off"
            )
        cfg = for_device(cfg, lm.device, lm.compute_dtype)
        self.lm, self.cfg, self.capacity = lm, cfg, capacity
        self.slots_in_use = capacity  # halved when a step runs out of memory
        self.routing = AdapterRouting(cfg.lora_routing == "mask", cfg.rank)
        targets = [
            (name, module)
            for name, module in lm.model.named_modules()
            if isinstance(module, nn.Linear) and _is_target(name, cfg.target_modules)
        ]
        if not targets:
            raise ValueError(no_targets(lm, cfg))
        self.layers: list[tuple[str, MultiLoraLinear]] = []
        for name, module in targets:  # named_modules order, which is also the order PEFT initialises in
            parent_name, _, child = name.rpartition(".")
            layer = MultiLoraLinear(module.requires_grad_(False), capacity, cfg, self.routing)
            setattr(lm.model.get_submodule(parent_name), child, layer)
            self.layers.append((name, layer))
        self.compiled = compiled_blocks(lm, self.layers) if cfg.compile else []
        # The C++ kernel where for_device chose it and it builds (auto: else PyTorch's operations, warned).
        required = cfg.lora_kernel == "cpp"
        self.kernel = None if cfg.lora_kernel == "python" else cpu_kernels(required=required)
        # While training through the kernel: the frozen output projection's tensors for the loss (TokenLosses)
        self.head: list[torch.Tensor] | None = None
        # While training: whether every product of a pass sums the same way on any number of threads, so that
        # the last lane may take the other threads the moment they are free (`_train_lanes`)
        self.thread_invariant = False
        # While training: whether passes go through packed_layers rather than the model's forward
        self.direct = False
        self.blocks = decoder_layers(lm)  # where the lanes' activation budget counts a pass's tokens
        self.budget: lane_budget.ActivationBudget | None = None  # the lanes' shared one, while they train
        self._init_lock = threading.Lock()  # lanes start jobs from the global random generator, one at a time
        # While generating with seal.decoding: the layers' groups for the slots in use (emptied on a load).
        self._decoding_groups: dict[tuple[int, ...], list[decoding.LayerGroups]] = {}

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [p for _, layer in self.layers for p in layer.slot_weights[slot]]

    @contextlib.contextmanager
    def _adapted(self, ids: torch.Tensor) -> Iterator[None]:
        """Inside this block the model's input is routed by `ids` (see AdapterRouting.set); outside it, the
        base model alone."""
        routing = self.routing.current()
        routing.set(ids)
        try:
            yield
        finally:
            routing.set(None)

    def _plan(self, job: UpdateJob) -> list[_Step]:
        """The job's steps in the order LoraUpdater takes them: same tokens, same shuffles, same batches."""
        cfg = self.cfg
        sequences = tokenize(self.lm, job.sequences, cfg.max_length, job.prefixes)
        order_rng = random.Random(job.seed)
        steps = []
        for epoch in range(job.settings(cfg)[1]):
            order = list(range(len(sequences)))
            order_rng.shuffle(order)
            for offset in range(0, len(order), cfg.batch_size):
                rows = [sequences[i] for i in order[offset : offset + cfg.batch_size]]
                steps.append(_Step(epoch, offset, rows, ends_epoch=offset + cfg.batch_size >= len(order)))
        return steps

    def _start(self, slot: int, index: int, job: UpdateJob) -> _Running:
        """Slot `slot` gets the adapter LoraUpdater.reset(job.seed) makes (PEFT's init, layer by layer) and a
        fresh AdamW, as LoraUpdater gives each job."""
        with self._init_lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)
            for _, layer in self.layers:
                nn.init.kaiming_uniform_(layer.lora_A[slot], a=math.sqrt(5))
                layer.lora_B[slot].zero_()
        params = self.slot_parameters(slot)
        for param in params:
            param.grad = None
        optimizer = batched_adamw(params, job.settings(self.cfg)[0], self.cfg.weight_decay)
        return _Running(index, self._plan(job), optimizer, UpdateResult(job.key), time.perf_counter())

    def train(self, jobs: list[UpdateJob], progress: str | None = None) -> list[TrainedAdapter]:
        """One adapter per job. Up to `capacity` jobs train together, their steps sharing packed passes;
        when a job ends its slot takes the next, so the slots stay busy. With several lanes (`adapt.lanes`)
        the slots and jobs are split between threads that train side by side, each lane as described. A
        failed update (non-finite loss) is recorded in its result and carries no weights; the other jobs go
        on. A step that runs out of memory halves the slots in use in its lane and restarts the jobs that were
        in it; with one slot left, the job fails with "out of memory"."""
        adapters: list[TrainedAdapter | None] = [None] * len(jobs)
        lanes = self._lanes(jobs)
        self.budget = self._budget() if len(lanes) > 1 else None
        bar = tqdm(total=len(jobs), desc=progress, disable=progress is None, leave=False)
        threads = torch.get_num_threads()
        self.lm.model.train()
        try:
            with (
                checkpointing(self.lm.model, self.cfg.gradient_checkpointing),
                swapped_forwards(self.compiled),
                # Compiled blocks would guard on each layer's own cast forward and recompile layer by layer.
                contextlib.nullcontext() if self.compiled else self.lm.frozen_casts(),
                self._kernel_layers(),
                norms_in_compute_dtype(self.lm, self.kernel) if self.kernel else contextlib.nullcontext(),
                fused_mlps(self.lm, self.kernel),
                fused_attentions(self.lm, self.kernel),
                attention.packed_attention(self.lm),  # a CPU: attention as batched products
            ):
                # Checkpointing and compiling go through each decoder layer's forward: not around it.
                plain = not self.compiled and not self.cfg.gradient_checkpointing
                self.direct = plain and direct_layers(self.lm, self.kernel)
                if len(lanes) == 1:
                    self._train_lane(*lanes[0], jobs, adapters, bar)
                else:
                    self._train_lanes(lanes, jobs, adapters, bar)
        finally:
            self.direct = False
            torch.set_num_threads(threads)
            self.slots_in_use = sum(len(slots) for slots, _ in lanes)
            self.lm.model.eval()
            for slot in range(self.capacity):
                for param in self.slot_parameters(slot):
                    param.grad = None
            bar.close()
        return adapters

    @contextlib.contextmanager
    def _kernel_layers(self, backward: bool = True) -> Iterator[None]:
        """Inside this block (within `LM.frozen_casts`) the adapted layers compute through the C++ kernel,
        if there is one: each gets its frozen weight in the compute dtype (autocast's, else float32) and, in
        bf16 with `model.pack_weights`, laid out once by oneDNN for the forward product and, transposed, for
        the input's gradient (2 x 0.27 GB for SmolLM2, handed back afterwards). Without `backward` (decoding,
        scoring) only the forward's layout is made; in float32, inside `LM.packed_weights`, its copies. For a
        `backward` the frozen output projection gets the same (`self.head`) for the training loss."""
        lm = self.lm
        dtype = lm.autocast_dtype or torch.float32
        if self.kernel is None or any(m.base_layer.weight.dtype != torch.float32 for _, m in self.layers):
            yield  # weights held in bf16 without autocast: PyTorch's operations, as they mix dtypes there
            return
        pack = lm.pack_weights and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()

        def compute_weight(base: nn.Linear) -> torch.Tensor:
            weight = lm.casts.get(base)  # the copy LM.frozen_casts made, if any
            return base.weight.detach().to(dtype) if weight is None else weight

        def frozen(base: nn.Linear) -> list[torch.Tensor]:
            weight = compute_weight(base)
            laid_out = None if backward else lm.packed.get(base)  # float32 decoding: LM.packed_weights' copy
            if laid_out is not None:
                return kernel_tensors(base, weight, pack=False) + [laid_out]
            return kernel_tensors(base, weight, pack, backward, self.kernel)

        head = output_projection(lm.model) if backward else None
        if head is not None and head.weight.requires_grad:
            head = None  # a trained head: autograd's cross-entropy (token_losses)

        def head_tensors() -> list[torch.Tensor] | None:
            return (
                None if head is None else kernel_tensors(head, compute_weight(head), pack, kernel=self.kernel)
            )

        try:
            tensors = [frozen(layer.base_layer) for _, layer in self.layers]
            self.head = head_tensors()
        except RuntimeError as error:  # a torch or CPU without oneDNN's bf16 layout
            log.warning("model.pack_weights: oneDNN could not lay out %s (%s)", dtype, error)
            pack = False
            tensors = [frozen(layer.base_layer) for _, layer in self.layers]
            self.head = head_tensors()
        self.thread_invariant = backward and self._own_products_only(tensors)
        order = product_order(tensors, self.head) if backward else None
        try:
            for (_, layer), layer_tensors in zip(self.layers, tensors, strict=True):
                layer.kernel, layer.kernel_frozen = self.kernel, layer_tensors
            if order:
                self.kernel.set_product_order(*order)
            yield
        finally:
            if order:
                self.kernel.set_product_order([], [])
            self.head, self.thread_invariant = None, False
            for _, layer in self.layers:
                layer.kernel, layer.kernel_frozen = None, []
            if pack:
                allocator.release_free_memory()  # else TCMalloc keeps the packed copies' pages

    def _own_products_only(self, tensors: list[list[torch.Tensor]]) -> bool:
        """Whether a training pass multiplies only through the kernel's own products (laid_weight's layout for
        every linear layer of the model, the output projection included; the adapters' and the attention's
        products through the micro-kernel of our own), whose sums do not depend on the number of threads. The
        other nodes (norms, silu, softmax, AdamW) compute each value alone."""
        if self.head is None:
            return False
        if not all(len(t) > 2 and all(x.dim() == 1 for x in t[2:]) for t in [*tensors, self.head]):
            return False  # some weight as it is, or laid out by oneDNN
        config = self.lm.model.config
        linears = sum(isinstance(m, nn.Linear) for m in self.lm.model.modules())
        width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        micro = self.kernel.brgemm_in_use() and self.cfg.rank % 16 == 0 and width % 16 == 0
        return micro and linears == len(self.layers) + 1

    @contextlib.contextmanager
    def _inference(self, adapters: list[TrainedAdapter | None], layers: bool = True) -> Iterator[None]:
        """Decoding and scoring through the C++ kernel where training uses it, the frozen weights cast and
        laid out once for the whole call (unless not `layers`: no pass goes through the model's layers), a
        decoding step's rows through their slots' stacked adapters; with no adapter among `adapters`, the
        base model as it is."""
        if all(adapter is None for adapter in adapters):
            yield
            return
        self.routing.stacked = self.kernel is not None
        try:
            with contextlib.ExitStack() as stack:
                if layers:
                    stack.enter_context(self.lm.frozen_casts())
                    stack.enter_context(self.lm.packed_weights())
                    stack.enter_context(self._kernel_layers(backward=False))
                yield
        finally:
            self.routing.stacked = False
            self._decoding_groups.clear()
            for _, layer in self.layers:
                layer.stacks.clear()

    def _lanes(self, jobs: list[UpdateJob]) -> list[tuple[list[int], deque[int]]]:
        """Each lane's slots and the jobs it trains, in order. The jobs are shared out by their estimated
        cost, each lane taking whole jobs, so that which lane trains a job does not depend on timing."""
        lanes = max(1, min(lane_count(self.cfg, self.lm.device), self.slots_in_use, len(jobs)))
        groups = balanced([job.cost(self.cfg) for job in jobs], lanes)
        slots = [list(range(self.slots_in_use)[lane::lanes]) for lane in range(lanes)]
        return [(slots[lane], deque(groups[lane])) for lane in range(lanes)]

    def _tail(
        self, lanes: list[tuple[list[int], deque[int]]], jobs: list[UpdateJob]
    ) -> tuple[int, int] | None:
        """(lane, round): where the lane predicted to end last takes every thread, from its first round that
        starts once the other lanes are predicted to have ended (`lane_rounds`). It waits there for them, so
        which rounds run on how many threads does not depend on timing. None with one lane, or when no round
        is left by then."""
        if len(lanes) < 2:
            return None

        def fed(step: _Step) -> list[int]:
            return list(fed_tokens(step.rows).values())

        costs = [
            lane_rounds(
                [[fed(step) for step in self._plan(jobs[i])] for i in queue], len(slots), self.cfg.pack_length
            )
            for slots, queue in lanes
        ]
        totals = [sum(rounds) for rounds in costs]
        last = totals.index(max(totals))
        others = max(total for lane, total in enumerate(totals) if lane != last)
        elapsed = 0
        for round_, cost in enumerate(costs[last]):
            if elapsed >= others:
                return last, round_
            elapsed += cost
        return None

    def _train_lanes(
        self,
        lanes: list[tuple[list[int], deque[int]]],
        jobs: list[UpdateJob],
        adapters: list[TrainedAdapter | None],
        bar: tqdm,
    ) -> None:
        """Each lane in a thread of its own, its operations single-threaded; the calling thread trains the
        lane `_tail` chose (else the first), which computes on all the threads once the others have ended:
        where the sums of its products do not depend on the number of threads (`thread_invariant`), from its
        first round after they end; elsewhere from the round `_tail` predicts, waiting there for them, so that
        which rounds run on how many threads does not depend on timing. (Only the calling thread computes on
        several: a second thread that does makes OpenMP keep a second team, and on the 2-core CPU every
        product on two threads then took longer than on one.) An error in a lane stops the other lanes at
        their next step and is raised here (the first lane's, if several fail)."""
        stop = threading.Event()
        budget = self.budget
        threads = torch.get_num_threads()
        tail = self._tail(lanes, jobs)
        here = tail[0] if tail else 0
        ended = [threading.Event() for _ in lanes]
        others = [event for lane, event in enumerate(ended) if lane != here]

        def widen(round_: int) -> bool:
            """Before each round of lane `here`: whether it computes on every thread from this round on."""
            if self.thread_invariant:
                if not all(event.is_set() for event in others):
                    return False
            elif not tail or round_ != tail[1]:
                return False
            for event in others:
                event.wait()
            torch.set_num_threads(threads)
            return True

        def lane(index: int, slots: list[int], queue: deque[int]) -> None:
            torch.set_num_threads(1)
            at = widen if index == here else None
            try:
                with self.routing.lane(), budget.lane(index) if budget else contextlib.nullcontext():
                    self._train_lane(slots, queue, jobs, adapters, bar, stop, at)
            except BaseException:
                stop.set()
                raise
            finally:
                ended[index].set()

        with (
            lane_budget.budgeted(self.blocks, budget) if budget else contextlib.nullcontext(),
            ThreadPoolExecutor(len(lanes) - 1, thread_name_prefix="seal-lane") as pool,
        ):
            futures = {i: pool.submit(lane, i, *lanes[i]) for i in range(len(lanes)) if i != here}
            error: BaseException | None = None
            try:
                lane(here, *lanes[here])
            except BaseException as raised:
                error = raised
            wait(futures.values())
            for i in range(len(lanes)):
                if i == here and error is not None:
                    raise error
                if i != here:
                    futures[i].result()

    def _budget(self) -> lane_budget.ActivationBudget | None:
        """The lanes' activation budget: `budget_passes` passes of `pack_length` tokens (or the longest
        pass's) through every decoder layer; None for no limit, or for a model whose decoder layers are not
        known."""
        passes = budget_passes(self.cfg)
        if not passes:
            return None
        if not self.blocks:
            log.warning("adapt.lane_budget: no decoder layer found in this model; the lanes run without it")
            return None
        return lane_budget.ActivationBudget(passes, self.cfg.pack_length, len(self.blocks))

    def _train_lane(
        self,
        slots: list[int],
        queue: deque[int],
        jobs: list[UpdateJob],
        adapters: list[TrainedAdapter | None],
        bar: tqdm,
        stop: threading.Event | None = None,
        widen: Callable[[int], bool] | None = None,
    ) -> None:
        """Trains the jobs of `queue` in `slots`; a step that runs out of memory drops the upper half of
        `slots`. `widen(round)` comes before each round (a `_step` of every running job) until it returns
        True."""
        running: dict[int, _Running] = {}  # slot -> job
        rounds = 0

        def finish(slot: int, error: str | None = None) -> None:
            job = running.pop(slot)
            job.result.error = error
            job.result.seconds = time.perf_counter() - job.started
            state = None if error else self._state(slot)
            adapters[job.index] = TrainedAdapter(jobs[job.index].key, job.result, state)
            bar.update()

        while (queue or running) and not (stop and stop.is_set()):
            for slot in slots:
                if slot not in running and queue:
                    index = queue.popleft()
                    running[slot] = self._start(slot, index, jobs[index])
                    if not running[slot].plan:
                        finish(slot, no_rows(self.cfg.max_length))
            if not running:
                continue
            if widen and widen(rounds):
                widen = None
                if stop and stop.is_set():  # a lane that failed has ended too
                    break
            rounds += 1
            try:
                self._step(running, finish)
            except RuntimeError as err:
                if not out_of_memory(err):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(running) == 1:
                    finish(next(iter(running)), "out of memory")
                    continue
                del slots[max(1, min(len(slots), len(running)) // 2) :]
                log.warning("out of memory with %d adapters: now %d", len(running), len(slots))
                queue.extendleft(sorted((job.index for job in running.values()), reverse=True))
                running.clear()

    def _step(self, running: dict[int, _Running], finish: Callable[..., None]) -> None:
        """One optimiser step of every running job: their rows packed into a few passes, each a forward and
        backward, the gradients adding up. A job steps as soon as the last pass holding its rows is done, so
        its gradients are gone before the next pass makes its activations. With SEAL's one sequence a step,
        only the gradients of the adapters in the current pass exist at once, not those of all K.

        A job whose activations overflow spreads NaN to every job in its pass (attention mixes the pass's
        keys and values, and 0 x inf is NaN). So a non-finite loss in a pass shared by several jobs fails no
        job yet: the step is computed again with each of those jobs' rows in passes of their own, where a
        non-finite loss is the job's own."""
        pending = sorted(running)  # the jobs whose step is not taken yet
        alone: set[int] = set()  # jobs whose rows are packed apart from the others'
        while pending:
            steps = {k: running[k].plan[running[k].done] for k in pending}
            rows = [row for k in pending for row in steps[k].rows]
            row_slots = [k for k in pending for _ in steps[k].rows]
            counts = [0] * self.capacity  # each slot's tokens with a target in this step
            for row, k in zip(rows, row_slots, strict=True):
                counts[k] += row.targets
            values = [0.0] * self.capacity  # each slot's loss, the mean over its tokens
            failed = [k for k in pending if not counts[k]]
            for k in failed:
                values[k] = math.nan  # as PEFT's mean over no token
            shared = False  # whether the failure came from a pass that held other jobs' rows too
            if not failed:
                step_counts = torch.tensor(counts, device=self.lm.device)
                groups = [set(pending) - alone, *({k} for k in sorted(alone.intersection(pending)))]
                batches = [batch for group in groups for batch in self._packed_rows(rows, row_slots, group)]
                last = {k: i for i, batch in enumerate(batches) for k in batch.present}
                for i, batch in enumerate(batches):
                    failed = self._pass(batch, step_counts, values)
                    if failed:
                        shared = len(batch.present) > 1
                        break
                    for k in batch.present:
                        if last[k] == i:
                            pending.remove(k)
                            if self._take_step(running[k], steps[k], counts[k], values[k]):
                                finish(k)
            if not failed:
                return
            if shared:
                alone.update(failed)  # suspects: packed apart when the step is computed again
            else:
                for k in failed:
                    at = steps[k]
                    finish(k, f"non-finite loss {values[k]} at epoch {at.epoch}, step {at.offset}")
                    pending.remove(k)
            # The failed rows' activations may hold NaN, and 0 x NaN is NaN in attention's backward: the
            # pending jobs' step is computed again without them, from no gradient. (The jobs that have
            # stepped already had all their rows in earlier passes, which the failed rows took no part in.)
            for k in pending:
                running[k].optimizer.zero_grad(set_to_none=True)

    def _packed_rows(self, rows: list[Row], row_slots: list[int], group: set[int]) -> list[PackedBatch]:
        """The packed passes of the rows that belong to the slots of `group`, in their order."""
        mine = [i for i, k in enumerate(row_slots) if k in group]
        if not mine:
            return []
        return pack_rows([rows[i] for i in mine], [row_slots[i] for i in mine], self.lm, self.cfg.pack_length)

    @staticmethod
    def _take_step(job: _Running, step: _Step, tokens: int, loss: float) -> bool:
        """Steps the job's optimiser and records the step; True if that was the job's last step."""
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.result.tokens += tokens
        job.losses.append(loss)
        if step.ends_epoch:
            job.result.epoch_losses.append(sum(job.losses) / len(job.losses))
            job.losses = []
        job.done += 1
        return job.done == len(job.plan)

    def _pass(self, batch: PackedBatch, counts: torch.Tensor, values: list[float]) -> list[int]:
        """Forward and backward of one packed sequence; adds each of its slots' share of the step's loss to
        `values`. Returns the slots whose loss is not finite, before any backward."""
        lm = self.lm
        keep = batch.targets != NO_TARGET
        slots = batch.slots[keep]
        present = batch.present
        # The routing stays set through backward: gradient checkpointing runs the layers again there.
        with self._adapted(batch.slots), self._counted(batch):
            with lm.autocast():
                inputs = dict(
                    input_ids=batch.ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.positions,
                    use_cache=False,
                )
                targets = batch.targets[keep]
                layers = self._packed_layers if self.direct else None
                kept = token_losses(
                    lm, inputs, keep, targets, kernel=self.kernel, frozen=self.head, layers=layers
                )
                losses = adapter_losses(kept, slots, counts)
            shares = losses.tolist()
            failed = [k for k in present if not math.isfinite(shares[k])]
            for k in present:
                values[k] += shares[k]
            if not failed:
                if self.budget:
                    self.budget.backward_begins()
                losses[present].sum().backward()
        return failed

    def _packed_layers(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """`packed_layers` for one of this updater's passes, each layer entered through the lanes' budget."""
        enter = functools.partial(lane_budget.entering, self.budget) if self.budget else None
        return packed_layers(self.lm, inputs, self.kernel, enter)

    def _counted(self, batch: PackedBatch) -> contextlib.AbstractContextManager:
        """The pass of `batch`, counted in the lanes' activation budget if they have one."""
        return self.budget.pass_(batch.ids.numel()) if self.budget else contextlib.nullcontext()

    def _state(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's weights on CPU under PEFT's keys, so LoraUpdater.applied accepts them too."""
        state = {}
        for name, layer in self.layers:
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[slot].detach().to("cpu", copy=True)
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[slot].detach().to("cpu", copy=True)
        return state

    @torch.no_grad()
    def _load(self, slot: int, adapter: TrainedAdapter) -> None:
        self._decoding_groups.clear()
        for name, layer in self.layers:
            layer.stacks.clear()
            layer.lora_A[slot].copy_(adapter.state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B[slot].copy_(adapter.state[f"{PEFT_PREFIX}{name}.lora_B.weight"])

    @torch.no_grad()
    def merge(self, adapter: TrainedAdapter) -> None:
        """Add `adapter` into the base weights for good (W += alpha/rank * B A in every adapted layer): the
        model alone then computes what base + adapter computed, and later adapters train on top of it. This
        is the one method that changes the base weights."""
        check_applicable([adapter])
        for name, layer in self.layers:
            merge_lora(
                layer.base_layer.weight,
                adapter.state[f"{PEFT_PREFIX}{name}.lora_A.weight"],
                adapter.state[f"{PEFT_PREFIX}{name}.lora_B.weight"],
                layer.scaling,
            )

    def generate(
        self,
        prompts: list[str],
        adapters: list[TrainedAdapter | None],
        *,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> list[str]:
        """As `seal.models.generate`, but prompt i is completed by base + adapters[i] (None: the base
        model), so prompts for different adapters share batches. Where every prompt has an adapter and
        `seal.decoding.LlamaSteps` computes whole layers through the kernels, nothing is cast or laid out for
        the model's layers: no pass goes through them."""
        lean = all(a is not None for a in adapters) and decoding.fits(self.lm)
        lean = lean and decoding.fused(self.lm, self._decoding_kernel())
        with self._inference(adapters, layers=not lean):
            return generate(
                self.lm,
                prompts,
                batch_size=batch_size,
                steps=self._steps() if any(a is not None for a in adapters) else None,
                lay_out=not lean,
                **self._routed(adapters, len(prompts), batch_size),
                **kwargs,
            )

    def _steps(self) -> Callable[[], ModelSteps] | None:
        """What computes a routed batch's decoding steps: `seal.decoding.LlamaSteps` where the model fits it
        and some row has an adapter, else the model's own forward (None)."""
        if not decoding.fits(self.lm):
            return None
        dtype = self.lm.autocast_dtype or torch.float32
        kernel = self._decoding_kernel()
        layout = kernel if decoding.fused(self.lm, kernel) else None  # its own layout only for decode_layer

        def groups(slots: tuple[int, ...]) -> list[decoding.LayerGroups]:
            if slots not in self._decoding_groups:
                self._decoding_groups.clear()  # one set at a time: each holds a copy of the frozen weights
                model = self.lm.model
                self._decoding_groups[slots] = decoding.stacked_groups(model, list(slots), dtype, layout)
            return self._decoding_groups[slots]

        def steps() -> ModelSteps | decoding.LlamaSteps:
            runs = self.routing.current().runs  # the batch was routed just before
            if not any(slot >= 0 for slot, _ in runs):
                return ModelSteps(self.lm)
            row_slots = [slot for slot, n in runs for _ in range(n)]
            return decoding.LlamaSteps(
                self.lm, self.cfg.rank, row_slots, groups(tuple(sorted(set(row_slots) - {-1}))), kernel
            )

        return steps

    def _decoding_kernel(self) -> Any:
        """The kernels `seal.decoding.LlamaSteps` computes with: where training uses their AVX-512 nodes."""
        return self.kernel if avx512_nodes(self.lm, self.kernel) else None

    def score(
        self,
        prompts: list[str],
        continuations: list[str],
        adapters: list[TrainedAdapter | None],
        *,
        batch_size: int = 16,
    ) -> list[tuple[float, int]]:
        """As `seal.models.continuation_logprobs`, with pair i scored by base + adapters[i]."""
        with self._inference(adapters):
            return continuation_logprobs(
                self.lm,
                prompts,
                continuations,
                batch_size=batch_size,
                share=lambda i: id(adapters[i]),  # a row is routed to one adapter
                **self._routed(adapters, len(prompts), batch_size),
            )

    def _routed(self, adapters: list[TrainedAdapter | None], n: int, batch_size: int) -> dict[str, Callable]:
        """`batches` and `context` for the batched calls of seal.models on `n` rows: a batch holds at most
        `capacity` distinct adapters, each loaded into a slot; each row is routed to its adapter's slot."""
        if len(adapters) != n:
            raise ValueError(f"{n} rows but {len(adapters)} adapters")
        check_applicable(adapters)

        holds: dict[int, int] = {}  # slot -> id of the adapter loaded into it by this call

        def route(idx: list[int]) -> contextlib.AbstractContextManager:
            # Each adapter keeps the slot it was loaded into while it is in use, so that routing the rows
            # still decoding when some end loads nothing again.
            wanted = {id(adapters[i]): adapters[i] for i in idx if adapters[i] is not None}
            slot_of = {held: slot for slot, held in holds.items() if held in wanted}
            free = [slot for slot in range(self.capacity) if holds.get(slot) not in slot_of]
            for key, adapter in wanted.items():
                if key not in slot_of:
                    slot_of[key] = slot = free.pop(0)
                    self._load(slot, adapter)
                    holds[slot] = key
            ids = [-1 if adapters[i] is None else slot_of[id(adapters[i])] for i in idx]
            return self._adapted(torch.tensor(ids, device=self.lm.device))

        return {
            "batches": lambda order: self._generation_batches(order, adapters, batch_size),
            "context": route,
        }

    def _generation_batches(
        self, order: list[int], adapters: list[TrainedAdapter | None], batch_size: int
    ) -> Iterator[list[int]]:
        """`order` cut into batches of at most `batch_size` prompts and `capacity` distinct adapters, each
        adapter's prompts side by side (one routing run per adapter)."""

        # Each adapter's prompts together (keeping the length order within them), so that a batch is cut
        # for a new adapter only once `capacity` adapters are in it.
        rank: dict[int, int] = {}
        for i in order:
            rank.setdefault(id(adapters[i]), len(rank))
        batch: list[int] = []
        distinct: set[int] = set()
        for i in sorted(order, key=lambda i: rank[id(adapters[i])]):
            adapter = adapters[i]
            new = adapter is not None and id(adapter) not in distinct
            if batch and (len(batch) == batch_size or (new and len(distinct) == self.capacity)):
                yield batch
                batch, distinct = [], set()
            batch.append(i)
            if adapter is not None:
                distinct.add(id(adapter))
        if batch:
            yield batch


def kernel_tensors(
    base: nn.Linear, weight: torch.Tensor, pack: bool, backward: bool = True, kernel: Any = None
) -> list[torch.Tensor]:
    """The frozen tensors the C++ kernel multiplies `base`'s input by: `weight` (the base weight in the
    compute dtype) and the bias (empty if none), then with `pack` the weight laid out for the forward product
    and, for a `backward`, its transpose for the input's gradient (seal/kernels/cpu.cpp): by `kernel` itself
    where `own_layout` holds (AVX-512 BF16 without AMX), else by oneDNN. oneDNN's transpose is `kernel`'s
    `transposed_copy` where it takes the weight (bf16 on AVX-512, both of SmolLM2's threads: its 30 layers
    and output projection in about 0.07 s, where `.t().contiguous()` took about 0.25 s, once per `train`)."""
    tensors = [weight, torch.empty(0) if base.bias is None else base.bias.detach()]
    if pack and own_layout(base, weight, kernel):
        return tensors + [kernel.laid_weight(weight, grad) for grad in (False, True)[: 1 + backward]]
    if pack:
        tensors.append(torch.ops.mkldnn._reorder_linear_weight(weight, None))
        if backward:
            tensors.append(torch.ops.mkldnn._reorder_linear_weight(transposed(weight, kernel), None))
    return tensors


def product_order(
    tensors: list[list[torch.Tensor]], head: list[torch.Tensor] | None
) -> tuple[list[torch.Tensor], list[int]] | None:
    """Where every frozen weight of a training pass is laid out by the kernel (`kernel_tensors`, the output
    projection's `head` included), those layouts in the order a pass multiplies by them, and their inner
    sizes, for the kernel's `set_product_order`: each adapted layer's forward layout in the model's order (a
    Llama's), the output projection's forward then backward layouts (the loss's gradient is computed in the
    forward), then the layers' backward layouts in reverse, as autograd runs them. None otherwise."""
    if head is None or not all(len(t) == 4 and t[2].dim() == 1 and t[3].dim() == 1 for t in [*tensors, head]):
        return None
    forward = [(t[2], t[0].shape[1]) for t in [*tensors, head]]  # W^T laid out: the inner size is `in`
    backward = [(t[3], t[0].shape[0]) for t in [head, *reversed(tensors)]]  # W: `out`
    return [laid for laid, _ in forward + backward], [inner for _, inner in forward + backward]


def own_layout(base: nn.Linear, weight: torch.Tensor, kernel: Any) -> bool:
    """Whether `kernel` lays `base`'s `weight` out for products of its own (`seal.kernels.lays_out`), which
    take no bias."""
    return base.bias is None and lays_out(kernel, weight)


def transposed(weight: torch.Tensor, kernel: Any = None) -> torch.Tensor:
    """`weight.t()` in memory of its own: through the C++ kernels where they take it."""
    fits = weight.dtype == torch.bfloat16 and weight.shape[0] % 2 == 0 and weight.shape[1] % 16 == 0
    if kernel is not None and fits and weight.device.type == "cpu" and kernel.avx512_available():
        return kernel.transposed_copy(weight)
    return weight.t().contiguous()


# Norms that compute exactly as Llama's RMSNorm (transformers copies its code into these model types).
LLAMA_NORMS = frozenset(
    f"{kind}RMSNorm" for kind in ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Phi3")
)


class NormInComputeDtype(torch.autograd.Function):
    """Llama's RMSNorm of a float32 `x`, x / sqrt(mean(x^2) + eps) * weight in float32 as transformers
    computes it, handed on in `dtype`, the compute dtype every adapted layer reading it casts it to (under
    bf16 autocast, q, k and v each cast the same output, then add their three float32 input gradients). Cast
    once here, its gradient comes back in `dtype` too: one cast a norm rather than one per reading layer each
    way. The weight is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
            ctx.save_for_backward(x, rstd, weight)
            return (x * rstd).mul_(weight).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            g = grad.float().mul_(weight)  # d(loss)/d(x rstd)
            normed = x * rstd
            grad_x = g.sub_(normed.mul_((g * normed).mean(-1, keepdim=True))).mul_(rstd)
        return grad_x, None, None, None


def module_forwards(
    lm: LM, kinds: frozenset[str], forward: Callable, keep: Callable[[nn.Module], bool]
) -> list[tuple[nn.Module, Callable]]:
    """For `swapped_forwards`: `forward(module, ...)` for each module of `lm` of a class named in `kinds` that
    `keep` accepts."""
    return [
        (module, functools.partial(forward, module))
        for module in lm.model.modules()
        if type(module).__name__ in kinds and keep(module)
    ]


def avx512_nodes(lm: LM, kernel: Any) -> bool:
    """Whether training `lm` goes through the C++ kernels' AVX-512 nodes (`rms_norm`, `swiglu`,
    `packed_attention`): the kernels built, bf16 autocast, a CPU with AVX-512."""
    return kernel is not None and lm.autocast_dtype == torch.bfloat16 and kernel.avx512_available()


@contextlib.contextmanager
def norms_in_compute_dtype(lm: LM, kernel: Any = None) -> Iterator[None]:
    """Inside this block, under bf16 or float16 autocast on a CPU, each Llama RMSNorm with a frozen weight
    hands its output on in the autocast dtype (NormInComputeDtype): the same numbers the layers reading it
    multiply by, fewer casts. Under bf16 with the C++ kernels on an AVX-512 CPU, the norm is their `rms_norm`
    node (the same within float32 rounding of the sum of squares, one pass each way). Its input in another
    dtype than float32 goes through the norm as it is."""
    dtype = lm.autocast_dtype
    if dtype is None or dtype == torch.float32 or lm.device.type != "cpu":
        yield
        return
    fused = avx512_nodes(lm, kernel)

    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return type(module).forward(module, x)
        if fused:
            return kernel.rms_norm(x, module.weight, module.variance_epsilon)
        return NormInComputeDtype.apply(x, module.weight, module.variance_epsilon, dtype)

    frozen = module_forwards(lm, LLAMA_NORMS, forward, lambda norm: not norm.weight.requires_grad)
    with swapped_forwards(frozen):
        yield


# Gated MLPs that compute exactly as Llama's, down(act(gate(x)) * up(x)).
LLAMA_MLPS = frozenset(f"{kind}MLP" for kind in ("Llama", "Mistral", "Qwen2", "Qwen3"))


@contextlib.contextmanager
def fused_mlps(lm: LM, kernel: Any) -> Iterator[None]:
    """Inside this block, under bf16 autocast on a CPU with AVX-512 and the C++ kernels, each Llama-style MLP
    whose activation is SiLU multiplies silu(gate) by up as one node of the kernel (`swiglu`): one pass over
    the activations each way instead of five, within bf16 rounding of PyTorch's. Anything else as it is."""
    if not avx512_nodes(lm, kernel):
        yield
        return

    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = module.gate_proj(x), module.up_proj(x)
        if gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16:
            return module.down_proj(module.act_fn(gate) * up)
        return module.down_proj(kernel.swiglu(gate, up))

    silu = module_forwards(lm, LLAMA_MLPS, forward, lambda mlp: type(mlp.act_fn).__name__ in SILU)
    with swapped_forwards(silu):
        yield


# Attentions that compute as Llama's: q, k and v projections, the rotary embedding, attention, o projection.
LLAMA_ATTENTIONS = frozenset(f"{kind}Attention" for kind in ("Llama", "Mistral", "Qwen2"))


@contextlib.contextmanager
def fused_attentions(lm: LM, kernel: Any) -> Iterator[None]:
    """Inside this block, on a CPU with AVX-512 and the C++ kernels, each Llama-style attention computes a
    packed pass under bf16 autocast (`attention.fusable`) as one node of the kernel (`packed_attention`): the
    rotary embedding, scores, softmax and the weighted values between its projections, in autocast's numbers
    for transformers' rotary embedding and `attention.packed_attention_forward`. Any other call goes through
    the module's own forward."""
    if not avx512_nodes(lm, kernel):
        yield
        return

    def forward(
        module: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        starts = attention.fusable(module, hidden_states, position_embeddings, attention_mask, kwargs)
        if starts is None:
            return type(module).forward(
                module,
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **kwargs,
            )
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
        heads = q.shape[-1] // module.head_dim
        cos, sin = position_embeddings
        return module.o_proj(kernel.packed_attention(q, k, v, cos, sin, starts, heads, module.scaling)), None

    attentions = module_forwards(lm, LLAMA_ATTENTIONS, forward, lambda module: True)
    with swapped_forwards(attentions):
        yield


# Decoder layers that compute as Llama's: norm, attention, residual sum, norm, MLP, residual sum.
LLAMA_LAYERS = frozenset(f"{kind}DecoderLayer" for kind in ("Llama", "Mistral", "Qwen2"))


def direct_layers(lm: LM, kernel: Any) -> bool:
    """Whether `packed_layers` may compute `lm`'s training passes: the kernels' AVX-512 nodes in use
    (`avx512_nodes`), and every decoder layer a Llama-style one whose seven projections are adapted layers
    computing through the kernel, whose MLP is SiLU-gated, and whose norms, like the last one, are frozen."""
    decoder = lm.model.base_model
    layers = getattr(decoder, "layers", None)
    if not avx512_nodes(lm, kernel) or not layers or not hasattr(decoder, "rotary_emb"):
        return False
    norms = [getattr(decoder, "norm", None)]
    for layer in layers:
        if (
            type(layer).__name__ not in LLAMA_LAYERS
            or type(layer.self_attn).__name__ not in LLAMA_ATTENTIONS
            or type(layer.mlp).__name__ not in LLAMA_MLPS
            or type(layer.mlp.act_fn).__name__ not in SILU
            or not all(isinstance(m, MultiLoraLinear) and m.kernel is not None for m in projections(layer))
        ):
            return False
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    return all(type(n).__name__ in LLAMA_NORMS and not n.weight.requires_grad for n in norms)


def projections(layer: nn.Module) -> list[nn.Module]:
    """A Llama-style decoder layer's seven linear layers: q, k, v, o, gate, up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def packed_layers(
    lm: LM,
    inputs: dict[str, torch.Tensor],
    kernel: Any,
    enter: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The last hidden state of a packed training pass (`inputs` as `token_losses` gets them) of a model
    that `direct_layers` accepts, each decoder layer's nodes called one after another: the calls, arguments
    and order of transformers' decoder layer with `norms_in_compute_dtype`, `fused_attentions`, `fused_mlps`
    and MultiLoraLinear's runs in place, so the same graph and the same numbers, without the dozen module
    calls around each layer's nodes (Python, hooks, the routing looked up by each projection). What enters
    each layer goes through `enter` first, if given (the lanes' budget, in place of `budgeted`'s hooks). None
    where the pass is not one that `fused_attentions` computes in one node: the caller then runs the model's
    forward."""
    decoder = lm.model.base_model
    hidden = decoder.embed_tokens(inputs["input_ids"])
    rotary = decoder.rotary_emb(hidden, inputs["position_ids"])
    first = decoder.layers[0].self_attn
    routing = first.q_proj.routing.current()
    starts = attention.fusable(first, hidden, rotary, inputs["attention_mask"], {})
    if starts is None or hidden.dtype != torch.float32 or not routing.per_token or routing.mask is not None:
        return None
    run_starts, lengths, slots = routing.adapter_runs()

    def linear(m: MultiLoraLinear, x: torch.Tensor) -> torch.Tensor:
        return kernel.lora_linear(x, m.kernel_frozen, *m.adapters(slots), run_starts, lengths, m.scaling)

    def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return kernel.rms_norm(x, module.weight, module.variance_epsilon)

    cos, sin = rotary
    for layer in decoder.layers[: decoder.config.num_hidden_layers]:  # as transformers' forward
        if enter is not None:
            hidden = enter(hidden)
        attn, mlp = layer.self_attn, layer.mlp
        x = norm(layer.input_layernorm, hidden)
        q, k, v = linear(attn.q_proj, x), linear(attn.k_proj, x), linear(attn.v_proj, x)
        heads = q.shape[-1] // attn.head_dim
        attended = kernel.packed_attention(q, k, v, cos, sin, starts, heads, attn.scaling)
        hidden = hidden + linear(attn.o_proj, attended)
        x = norm(layer.post_attention_layernorm, hidden)
        gate, up = linear(mlp.gate_proj, x), linear(mlp.up_proj, x)
        hidden = hidden + linear(mlp.down_proj, kernel.swiglu(gate, up))
    return norm(decoder.norm, hidden)


def compiled_blocks(lm: LM, layers: list[tuple[str, MultiLoraLinear]]) -> list[tuple[nn.Module, Callable]]:
    """Each decoder layer of `lm` (the classes transformers keeps whole across devices, `_no_split_modules`)
    with a `torch.compile`d forward, dynamic in shape; the MultiLoraLinear layers inside stay eager, since
    their routing changes from pass to pass and would make every new set of slots a recompile. Compiling
    happens at the first call (`swapped_forwards` puts these forwards in place while training)."""
    blocks = decoder_layers(lm)
    if not blocks:
        raise ValueError(f"adapt.compile: no decoder layer found in {type(lm.model).__name__}")
    for _, layer in layers:
        layer.forward = torch.compiler.disable(layer.forward, recursive=True)
    return [(block, torch.compile(block.forward, dynamic=True)) for block in blocks]


def decoder_layers(lm: LM) -> list[nn.Module]:
    """The decoder layers of `lm`: the modules of the classes transformers keeps whole across devices
    (`_no_split_modules`); none if the model does not name them."""
    names = set(getattr(lm.model, "_no_split_modules", None) or [])
    return [module for module in lm.model.modules() if type(module).__name__ in names]


@contextlib.contextmanager
def swapped_forwards(forwards: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Inside this block each module's forward is the given one; outside it, the module's own again (so
    generation and scoring stay eager)."""
    own = [module.__dict__.get("forward") for module, _ in forwards]  # a forward set on the instance, if any
    for module, forward in forwards:
        module.forward = forward
    try:
        yield
    finally:
        for (module, _), forward in zip(forwards, own, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def slot_bytes(lm: LM, cfg: AdaptConfig) -> int:
    """Memory one more adapter slot needs while training: its float32 weights, gradients and two AdamW
    moments. (The activations are one pass's whatever the number of slots: `pass_bytes`.)"""
    adapter = sum(
        cfg.rank * (module.in_features + module.out_features)
        for name, module in lm.model.named_modules()
        if isinstance(module, nn.Linear) and _is_target(name, cfg.target_modules)
    )
    if not adapter:
        raise ValueError(no_targets(lm, cfg))
    return 4 * 4 * adapter


def no_targets(lm: LM, cfg: AdaptConfig) -> str:
    """Why no layer of the model can take an adapter."""
    if any(isinstance(module, MultiLoraLinear) for module in lm.model.modules()):
        return (
            "this model's layers already hold a batched updater's adapters (seal.multilora.MultiLoraUpdater):"
            " train with that updater rather than making another on the same model"
        )
    return f"no linear layer matches adapt.target_modules={cfg.target_modules}"


def pass_bytes(lm: LM, cfg: AdaptConfig) -> int:
    """Estimated activations kept for backward by one pass of `cfg.pack_length` tokens. Per token and layer a
    Llama-style block keeps about 10 hidden-size and 3 intermediate-size vectors (inputs of the projections
    and norms, attention and MLP products); with gradient checkpointing, one hidden-size vector per layer
    plus one whole layer's recomputed ones. A model whose logits are more than its output projection (not
    `output_projection`) also keeps every position's: float32 log-probabilities for the loss and one
    logits-sized tensor of its own (a soft-cap's tanh), where a plain head keeps none (TokenLosses)."""
    config = lm.model.config
    width = getattr(config, "intermediate_size", 4 * config.hidden_size)
    block = (10 * config.hidden_size + 3 * width) * lm.model.dtype.itemsize
    if attention.applies(lm):
        # seal.attention keeps each head's row of float32 scores and of probabilities, in passes of at most
        # MAX_TOKENS tokens (longer ones go to SDPA, which keeps no scores).
        tokens = min(cfg.pack_length, attention.MAX_TOKENS)
        block += config.num_attention_heads * tokens * (4 + lm.model.dtype.itemsize)
    if cfg.gradient_checkpointing:
        per_token = config.num_hidden_layers * config.hidden_size * lm.model.dtype.itemsize + block
    else:
        per_token = config.num_hidden_layers * block
    if output_projection(lm.model) is None:
        per_token += config.vocab_size * (4 + lm.model.dtype.itemsize)
    return max(cfg.pack_length, cfg.max_length) * per_token


def fit_capacity(lm: LM, cfg: AdaptConfig) -> int:
    """`cfg.max_adapters`, or fewer if that many would not fit in `cfg.memory_budget_mb` (0: auto) beside one
    pass's activations per lane."""
    cfg = for_device(cfg, lm.device, lm.compute_dtype)
    budget = cfg.memory_budget_mb * MB
    if budget <= 0:
        if lm.device.type == "cuda":
            budget = 0.9 * torch.cuda.mem_get_info(lm.device)[0]
        else:
            budget = 0.8 * psutil.virtual_memory().available
    passes = lane_count(cfg, lm.device)  # one pass's activations a lane, at most `lane_budget` passes' in all
    if passes > 1 and (limit := budget_passes(cfg)):
        passes = max(1.0, min(passes, limit))
    per_slot, activations = slot_bytes(lm, cfg), pass_bytes(lm, cfg) * passes
    capacity = max(1, min(cfg.max_adapters, int((budget - activations) // per_slot)))
    if capacity < cfg.max_adapters:
        log.info(
            "%d adapters at a time, not %d: about %.0f MB each beside %.0f MB of activations, budget %.0f MB",
            capacity,
            cfg.max_adapters,
            per_slot / MB,
            activations / MB,
            budget / MB,
        )
    return capacity


def for_device(cfg: AdaptConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> AdaptConfig:
    """`cfg` with its `auto` settings chosen for the device and the dtype the passes compute in, and lanes
    refused where they do not work (auto lanes are chosen by `MultiLoraUpdater.train`, from the threads torch
    has then). On a GPU a pass of SmolLM2 is bound by kernel launches, not arithmetic, so fewer, larger
    operations win: routing by mask and passes of 2,048 tokens (H100, 4 adapters: 1.9x faster than runs and
    256, benchmarks/README.md). A CPU pays for every multiply-add: routing by runs, and passes of 512
    tokens (two passages and some self-edit lines) in bf16, where a pass's fixed cost weighs more, but 256 in
    float32, where 512 was about as fast and two lanes' passes held twice the activations (the AVX2 CPU's
    bench: 4 adapters at 1.62-1.67x one adapter's peak against 1.44-1.47x)."""
    cuda = device.type == "cuda"
    routing = cfg.lora_routing if cfg.lora_routing != "auto" else ("mask" if cuda else "runs")
    if routing not in ("runs", "mask"):
        raise ValueError(f"unknown adapt.lora_routing {cfg.lora_routing!r}: expected auto, runs or mask")
    if cfg.pack_length < 0:
        raise ValueError(f"adapt.pack_length must be positive (0: auto), got {cfg.pack_length}")
    pack_length = cfg.pack_length or (2048 if cuda else 512 if dtype.itemsize == 2 else 256)
    kernel_fits = not cuda and routing == "runs" and not cfg.compile and not cfg.dropout
    if cfg.lora_kernel not in ("auto", "cpp", "python"):
        raise ValueError(f"unknown adapt.lora_kernel {cfg.lora_kernel!r}: expected auto, cpp or python")
    if cfg.lora_kernel == "cpp" and not kernel_fits:
        raise ValueError(
            "adapt.lora_kernel=cpp is for CPU training with adapt.lora_routing=runs, adapt.compile=false and "
            "adapt.dropout=0"
        )
    kernel = cfg.lora_kernel if cfg.lora_kernel != "auto" or kernel_fits else "python"  # auto: if it builds
    if cfg.lanes < 0:
        raise ValueError(f"adapt.lanes must be 0 (auto) or more, got {cfg.lanes}")
    if cfg.lanes > 1 and (why := _no_lanes(cfg, device)):
        raise ValueError(f"adapt.lanes > 1 {why}")
    return replace(cfg, lora_routing=routing, pack_length=pack_length, lora_kernel=kernel)


def _no_lanes(cfg: AdaptConfig, device: torch.device) -> str | None:
    """Why several lanes would not work, or None where they do."""
    if device.type == "cuda":
        return (
            "is for CPUs: on CUDA the autograd engine runs backward (and a checkpoint's recomputation) in "
            "threads of its own, which would not see a lane's routing"
        )
    if cfg.compile or cfg.dropout:
        return (
            "needs adapt.compile=false and adapt.dropout=0: compiled layers are not called from several "
            "threads, and dropout's random masks would depend on the threads' timing"
        )
    return None


def budget_passes(cfg: AdaptConfig) -> float:
    """The passes' activations the lanes may hold together (`adapt.lane_budget`); 0: no limit, as with
    gradient checkpointing, whose layers run forward again inside backward, where a lane must not wait."""
    return 0.0 if cfg.gradient_checkpointing else max(0.0, cfg.lane_budget)


def lane_count(cfg: AdaptConfig, device: torch.device) -> int:
    """`cfg.lanes`, or for auto (0) one lane per torch thread where lanes work (`_no_lanes`), else one."""
    if cfg.lanes:
        return cfg.lanes
    return 1 if _no_lanes(cfg, device) else torch.get_num_threads()


def _is_target(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of target modules: the module's name is one of them or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)
