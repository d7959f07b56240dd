"""The inner loop, batched: K LoRA adapters trained together in one forward/backward per step.

SEAL trains one throw-away adapter per self-edit, and each is small: training them one after another leaves
the accelerator mostly idle. Here every targeted linear layer holds K adapter slots side by side, and each
token of a batch says which slot it uses, so K jobs share every forward and backward pass. Each adapter's loss
is the mean over its own tokens and the total is their sum, so each adapter gets exactly the gradient it would
get alone; a masked AdamW then updates only the slots that had a batch. The result matches
`seal.adapt.LoraUpdater` job for job (same initialisation, data order and optimiser), up to float rounding.

A step's rows are packed end to end rather than padded to the longest: SEAL mixes a ~200-token passage with
~20-token self-edit lines, so padding every row to the passage's length would spend most of the compute on
padding. A block-diagonal causal mask and positions that restart at 0 for each row keep every row's
activations exactly what they would be alone.

The same slots, given per row, let one `generate` call serve prompts that each need a different adapter.
Adapter weights use PEFT's state-dict keys, so adapters from either updater can be applied by the other.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seal.adapt import TrainedAdapter, UpdateJob, UpdateResult, check_applicable, tokenize
from seal.config import AdaptConfig
from seal.models import LM, generate

PEFT_PREFIX = "base_model.model."  # where PEFT's wrapper puts the model in its state-dict keys
# Attention implementations that take a custom 4D mask: sdpa as booleans (True: may attend), eager as an
# additive float mask. Flash attention takes no such mask.
PACKABLE_ATTENTION = ("sdpa", "eager")
NO_TARGET = -100  # a packed token with nothing to predict (its row's last token, padding)


class AdapterRouting:
    """Which adapter slot each row, or each token, of the next forward pass uses. One instance is shared by
    all the MultiLoraLinear layers of a model, so the owner sets it once per forward and the sorting below
    is done once, not once per layer."""

    def __init__(self) -> None:
        self.per_token = False  # True: `index` counts tokens of the flattened batch; False: rows
        self.index: torch.Tensor | None = None  # adapted rows or tokens, grouped by slot; None: none adapted
        self.slots: list[int] = []  # the slots present, in the order of their groups in `index`
        self.counts: list[int] = []  # how many of `index` each of those slots has

    def set(self, ids: torch.Tensor | None) -> None:
        """`ids` of shape [batch] gives each row's slot, [batch, length] each token's; -1 is the base model
        alone, and None means every row uses the base model."""
        self.index, self.slots, self.counts = None, [], []
        if ids is None:
            return
        self.per_token = ids.dim() == 2
        flat = ids.flatten()
        adapted = (flat >= 0).nonzero().squeeze(1)
        if adapted.numel() == 0:
            return
        self.index = adapted[flat[adapted].argsort(stable=True)]
        slots, counts = torch.unique_consecutive(flat[self.index], return_counts=True)
        self.slots, self.counts = slots.tolist(), counts.tolist()


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus `capacity` LoRA adapters; each routed row or token of the input goes
    through the adapter of its slot: base(x) + scaling * B[slot] A[slot] x, as PEFT computes one adapter.
    The routed inputs are gathered slot by slot, so each slot is one plain matmul with its own A and B and
    no per-row or per-token copy of the weights is ever made."""

    def __init__(self, base: nn.Linear, capacity: int, cfg: AdaptConfig, routing: AdapterRouting):
        super().__init__()
        self.base_layer, self.routing = base, routing
        device = base.weight.device
        # float32 whatever the base dtype, as PEFT keeps adapters (its autocast_adapter_dtype default).
        self.lora_A = nn.Parameter(torch.zeros(capacity, cfg.rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(capacity, base.out_features, cfg.rank, device=device))
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        routing = self.routing
        if routing.index is None:
            return result
        # Dim 0 of these views is what the routing indexes: tokens of the flattened batch, or whole rows.
        inputs = x.flatten(0, -2) if routing.per_token else x
        outputs = result.flatten(0, -2) if routing.per_token else result
        picked = self.dropout(inputs.index_select(0, routing.index).to(self.lora_A.dtype))
        groups = zip(routing.slots, picked.split(routing.counts), strict=True)
        delta = torch.cat([part @ self.lora_A[s].T @ self.lora_B[s].T for s, part in groups]) * self.scaling
        out = outputs.to(torch.promote_types(result.dtype, delta.dtype)).index_add(0, routing.index, delta)
        return out.view(result.shape).to(result.dtype)


def pack(lengths: list[int], pack_length: int) -> list[list[int]]:
    """The indices of `lengths` in bins of at most `pack_length` tokens. Every bin is then padded to the
    fullest one, so a plan costs (bins x fullest bin) tokens: few bins are not enough, they must also be
    evenly filled. First-fit decreasing finds few bins but leaves the last ones nearly empty; spreading the
    rows, longest first, each onto the emptiest of the fewest bins that hold them balances them but may
    need a bin more. Both are tried and the cheaper plan is kept."""
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


@dataclass
class PackedBatch:
    """A step's rows laid end to end in a few sequences of equal length, padded only at their ends."""

    ids: torch.Tensor  # [P, T] token ids
    positions: torch.Tensor  # [P, T] each token's position in its own row, so RoPE sees the row alone
    slots: torch.Tensor  # [P, T] each token's adapter slot; -1 for padding, which needs no adapter
    targets: torch.Tensor  # [P, T] the next token of the same row; NO_TARGET after a row's last token
    attention_mask: torch.Tensor  # [P, 1, T, T] causal within a row, nothing across rows


def pack_rows(rows: list[list[int]], row_slots: list[int], lm: LM, pack_length: int) -> PackedBatch:
    """Pack `rows` (row i trains slot row_slots[i]) into sequences of at most max(pack_length, longest row)
    tokens, in the attention-mask format of `lm`'s attention implementation."""
    lengths = [len(row) for row in rows]
    bins = pack(lengths, max(pack_length, *lengths))
    width = max(sum(lengths[i] for i in members) for members in bins)
    pad = lm.tokenizer.pad_token_id
    ids = [[pad] * width for _ in bins]
    positions = [[0] * width for _ in bins]
    slots = [[-1] * width for _ in bins]
    targets = [[NO_TARGET] * width for _ in bins]
    segments = [[-1] * width for _ in bins]  # which row each token belongs to; padding is a segment too
    for p, members in enumerate(bins):
        start = 0
        for i in members:
            end = start + lengths[i]
            ids[p][start:end] = rows[i]
            positions[p][start:end] = range(lengths[i])
            slots[p][start:end] = [row_slots[i]] * lengths[i]
            targets[p][start : end - 1] = rows[i][1:]  # the last token predicts nothing, not the next row
            segments[p][start:end] = [i] * lengths[i]
            start = end
    device = lm.device
    segment = torch.tensor(segments, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Padding attends to earlier padding, so no query row is fully masked (that would give NaN in sdpa).
    allowed = ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)
    mask = allowed
    if lm.model.config._attn_implementation == "eager":  # eager adds the mask to the attention scores
        dtype = lm.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return PackedBatch(
        ids=torch.tensor(ids, device=device),
        positions=torch.tensor(positions, device=device),
        slots=torch.tensor(slots, device=device),
        targets=torch.tensor(targets, device=device),
        attention_mask=mask,
    )


def adapter_losses(
    logits: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor, capacity: int
) -> torch.Tensor:
    """Per slot, the mean next-token cross-entropy over that slot's tokens that have a target (NaN for a slot
    with none, as PEFT's mean over nothing). Slots without rows get NaN too; callers only read their own."""
    keep = (targets != NO_TARGET).nonzero(as_tuple=True)
    per_token = nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    sums = per_token.new_zeros(capacity).index_add(0, slots[keep], per_token)
    counts = torch.bincount(slots[keep], minlength=capacity).to(sums.dtype)
    return sums / counts


class MaskedAdamW:
    """torch.optim.AdamW's update (same formula and order of operations) over stacked [K, ...] parameters,
    applied only to the slots named at each step. Each slot keeps its own step count, so an adapter that had
    no batch, or failed, does not move and its moments do not drift."""

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),  # torch.optim.AdamW's defaults, as LoraUpdater uses
        eps: float = 1e-8,
    ):
        self.params, self.lr, self.weight_decay, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [0] * params[0].shape[0]

    @torch.no_grad()
    def step(self, slots: list[int]) -> None:
        by_step: dict[int, list[int]] = {}
        for slot in slots:
            self.steps[slot] += 1
            by_step.setdefault(self.steps[slot], []).append(slot)
        beta1, beta2 = self.betas
        for step, group in by_step.items():
            index = torch.tensor(group, device=self.params[0].device)
            step_size = self.lr / (1 - beta1**step)
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            moments = zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True)
            for param, exp_avg_all, exp_avg_sq_all in moments:
                value, grad = param.index_select(0, index), param.grad.index_select(0, index)
                exp_avg = exp_avg_all.index_select(0, index)
                exp_avg_sq = exp_avg_sq_all.index_select(0, index)
                if self.weight_decay != 0:
                    value.mul_(1 - self.lr * self.weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                value.addcdiv_(exp_avg, denom, value=-step_size)
                param.index_copy_(0, index, value)
                exp_avg_all.index_copy_(0, index, exp_avg)
                exp_avg_sq_all.index_copy_(0, index, exp_avg_sq)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


@dataclass
class _Step:
    """One optimiser step of one job: the sequences it trains on and where it sits in the job's loop."""

    epoch: int
    offset: int  # index of the step's first sequence in the epoch's shuffled order (LoraUpdater's `step`)
    rows: list[list[int]]
    ends_epoch: bool


class MultiLoraUpdater:
    def __init__(self, lm: LM, cfg: AdaptConfig, capacity: int, pack_length: int = 512):
        """Replace the `cfg.target_modules` linear layers of `lm.model` in place with `capacity`-slot
        MultiLoraLinear layers. The base weights are frozen and never change.

        Training packs each step's rows into sequences of `pack_length` tokens (or the longest row, if
        longer): long enough for a passage and many self-edit lines, short enough that the masked-out part
        of each sequence's attention stays a small fraction of the step's compute."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        attention = lm.model.config._attn_implementation
        if attention not in PACKABLE_ATTENTION:
            raise ValueError(
                f"packed training needs model.attn_implementation in {PACKABLE_ATTENTION}, got {attention!r}"
            )
        self.lm, self.cfg, self.capacity, self.pack_length = lm, cfg, capacity, pack_length
        self.routing = AdapterRouting()
        targets = [
            (name, module)
            for name, module in lm.model.named_modules()
            if isinstance(module, nn.Linear) and _is_target(name, cfg.target_modules)
        ]
        if not targets:
            raise ValueError(f"no linear layer matches adapt.target_modules={cfg.target_modules}")
        self.layers: list[tuple[str, MultiLoraLinear]] = []
        for name, module in targets:  # named_modules order, which is also the order PEFT initialises in
            parent_name, _, child = name.rpartition(".")
            layer = MultiLoraLinear(module.requires_grad_(False), capacity, cfg, self.routing)
            setattr(lm.model.get_submodule(parent_name), child, layer)
            self.layers.append((name, layer))
        self.params = [p for _, layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    @contextlib.contextmanager
    def _adapted(self, ids: torch.Tensor) -> Iterator[None]:
        """Inside this block the model's input is routed by `ids` (see AdapterRouting.set); outside it, the
        base model alone."""
        self.routing.set(ids)
        try:
            yield
        finally:
            self.routing.set(None)

    def train(self, jobs: list[UpdateJob]) -> list[TrainedAdapter]:
        """One adapter per job, `capacity` jobs trained at a time. A failed update (non-finite loss, out of
        memory) is recorded in its result and carries no weights; the other jobs go on."""
        adapters: list[TrainedAdapter] = []
        for start in range(0, len(jobs), self.capacity):
            adapters += self._train_chunk(jobs[start : start + self.capacity])
        return adapters

    def _plan(self, job: UpdateJob) -> list[_Step]:
        """The job's steps in the order LoraUpdater takes them: same tokens, same shuffles, same batches."""
        cfg = self.cfg
        sequences = tokenize(self.lm, job.sequences, cfg.max_length)
        order_rng = random.Random(job.seed)
        steps = []
        for epoch in range(cfg.epochs):
            order = list(range(len(sequences)))
            order_rng.shuffle(order)
            for offset in range(0, len(order), cfg.batch_size):
                rows = [sequences[i] for i in order[offset : offset + cfg.batch_size]]
                steps.append(_Step(epoch, offset, rows, ends_epoch=offset + cfg.batch_size >= len(order)))
        return steps

    @torch.no_grad()
    def _reset(self, jobs: list[UpdateJob]) -> None:
        """Slot k gets the adapter LoraUpdater.reset(jobs[k].seed) makes: PEFT's init, layer by layer."""
        for slot, job in enumerate(jobs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(job.seed)
                for _, layer in self.layers:
                    nn.init.kaiming_uniform_(layer.lora_A.data[slot], a=math.sqrt(5))
                    layer.lora_B.data[slot].zero_()

    def _train_chunk(self, jobs: list[UpdateJob]) -> list[TrainedAdapter]:
        lm = self.lm
        start = time.perf_counter()
        results = [UpdateResult(job.key) for job in jobs]
        plans = [self._plan(job) for job in jobs]
        for result, plan in zip(results, plans, strict=True):
            if not plan:
                result.error = "no training sequences"
        self._reset(jobs)
        optimizer = MaskedAdamW(self.params, self.cfg.lr, self.cfg.weight_decay)
        epoch_losses: list[list[float]] = [[] for _ in jobs]
        lm.model.train()
        try:
            for s in range(max(len(plan) for plan in plans)):
                slots = [k for k in range(len(jobs)) if results[k].error is None and s < len(plans[k])]
                if not slots:
                    break
                rows = [row for k in slots for row in plans[k][s].rows]
                row_slots = [k for k in slots for _ in plans[k][s].rows]
                batch = pack_rows(rows, row_slots, lm, self.pack_length)
                with self._adapted(batch.slots), lm.autocast():
                    logits = lm.model(
                        input_ids=batch.ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.positions,
                        use_cache=False,
                    ).logits
                losses = adapter_losses(logits, batch.targets, batch.slots, self.capacity)
                values = losses.tolist()
                trained = []
                for k in slots:
                    if math.isfinite(values[k]):
                        trained.append(k)
                    else:
                        at = plans[k][s]
                        error = f"non-finite loss {values[k]} at epoch {at.epoch}, step {at.offset}"
                        results[k].error = error
                if trained:
                    losses[trained].sum().backward()
                    optimizer.step(trained)
                    optimizer.zero_grad()
                for k in trained:
                    results[k].tokens += sum(len(row) - 1 for row in plans[k][s].rows)  # tokens with a target
                    epoch_losses[k].append(values[k])
                    if plans[k][s].ends_epoch:
                        results[k].epoch_losses.append(sum(epoch_losses[k]) / len(epoch_losses[k]))
                        epoch_losses[k] = []
        except torch.OutOfMemoryError:
            for result in results:
                result.error = "out of memory"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            lm.model.eval()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        adapters = []
        for slot, (job, result) in enumerate(zip(jobs, results, strict=True)):
            result.seconds = seconds
            adapters.append(TrainedAdapter(job.key, result, None if result.error else self._state(slot)))
        return adapters

    def _state(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's weights on CPU under PEFT's keys, so LoraUpdater.applied accepts them too."""
        state = {}
        for name, layer in self.layers:
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[slot].detach().to("cpu", copy=True)
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[slot].detach().to("cpu", copy=True)
        return state

    @torch.no_grad()
    def _load(self, slot: int, adapter: TrainedAdapter) -> None:
        for name, layer in self.layers:
            layer.lora_A[slot].copy_(adapter.state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B[slot].copy_(adapter.state[f"{PEFT_PREFIX}{name}.lora_B.weight"])

    def generate(
        self,
        prompts: list[str],
        adapters: list[TrainedAdapter | None],
        *,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> list[str]:
        """As `seal.models.generate`, but prompt i is completed by base + adapters[i] (None: the base
        model), so prompts for different adapters share batches. A batch holds at most `capacity` distinct
        adapters."""
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        check_applicable(adapters)

        def route(idx: list[int]) -> contextlib.AbstractContextManager:
            slot_of: dict[int, int] = {}  # id(adapter) -> its slot in this batch
            ids = []
            for i in idx:
                adapter = adapters[i]
                if adapter is not None and id(adapter) not in slot_of:
                    slot_of[id(adapter)] = len(slot_of)
                    self._load(slot_of[id(adapter)], adapter)
                ids.append(-1 if adapter is None else slot_of[id(adapter)])
            return self._adapted(torch.tensor(ids, device=self.lm.device))

        return generate(
            self.lm,
            prompts,
            batch_size=batch_size,
            batches=lambda order: self._generation_batches(order, adapters, batch_size),
            context=route,
            **kwargs,
        )

    def _generation_batches(
        self, order: list[int], adapters: list[TrainedAdapter | None], batch_size: int
    ) -> Iterator[list[int]]:
        """Consecutive runs of `order`, each at most `batch_size` prompts and `capacity` distinct adapters."""
        batch: list[int] = []
        distinct: set[int] = set()
        for i in order:
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


def _is_target(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of target modules: the module's name is one of them or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)
