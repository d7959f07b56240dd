"""The inner loop: one fresh LoRA adapter per self-edit, trained on its sequences, evaluated, then dropped.

`LoraUpdater` wraps the frozen model with PEFT once. Each job re-initialises the adapter from its own seed and
trains it; its weights are kept on the CPU and applied again for evaluation. The base weights change only
when `merge` is called (the continual mode) or the outer loop copies in the fine-tuned generator.
`train` takes a batch of jobs so that a batched multi-adapter implementation can replace the loop inside it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from tqdm import tqdm

from seal.config import AdaptConfig
from seal.memory import out_of_memory
from seal.models import LM, continuation_logprobs, generate

ADAPTER = "inner"
# What a step costs beyond its text, in characters' worth, for estimating a job's update time
# (`UpdateJob.cost`): every sequence is a step of its own (batch size 1), with a fixed cost (the pass's own
# work, the optimiser step). Fitted to single-thread update times of the bench's jobs on this repository's
# 2-core CPU: 0.45 s per step per epoch against 0.003 s per character.
STEP_COST_CHARS = 150

log = logging.getLogger(__name__)


@dataclass
class UpdateJob:
    key: str  # names the job in records, e.g. "passage/Corvane Sodium Cell"
    sequences: list[str]
    seed: int
    # Read but not learnt: prefixes[i] comes before sequences[i] without a loss (a prompt, so that only its
    # completion is learnt). None: every token of every sequence is learnt.
    prefixes: list[str] | None = None
    # This job's own learning rate and epochs (a few-shot self-edit picks them); None: adapt.lr, adapt.epochs.
    lr: float | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"update job {self.key!r}: epochs={self.epochs}, expected at least 1")

    def settings(self, cfg: AdaptConfig) -> tuple[float, int]:
        return (cfg.lr if self.lr is None else self.lr), (cfg.epochs if self.epochs is None else self.epochs)

    def cost(self, cfg: AdaptConfig) -> int:
        """The job's update time, roughly, in characters' worth (for sharing jobs out evenly): each epoch, its
        text plus STEP_COST_CHARS a sequence."""
        prefixes = self.prefixes or [""] * len(self.sequences)
        text = sum(len(p) + len(s) + STEP_COST_CHARS for p, s in zip(prefixes, self.sequences, strict=True))
        return self.settings(cfg)[1] * text


@dataclass(frozen=True)
class Row:
    """One training sequence as token ids; tokens from `learn_from` on have a loss (token 0 never does:
    nothing predicts it)."""

    ids: list[int]
    learn_from: int = 1

    @property
    def targets(self) -> int:
        return max(0, len(self.ids) - self.learn_from)


@dataclass
class UpdateResult:
    key: str
    epoch_losses: list[float] = field(default_factory=list)
    tokens: int = 0  # trained tokens (padding excluded), summed over epochs
    seconds: float = 0.0
    error: str | None = None  # why the update failed (non-finite loss, out of memory); None when it worked


@dataclass
class TrainedAdapter:
    key: str
    result: UpdateResult
    state: dict[str, torch.Tensor] | None  # LoRA weights on CPU; None when the update failed


class Updater(Protocol):
    """What tasks need of an inner loop; `LoraUpdater` and `seal.multilora.MultiLoraUpdater` provide it."""

    def train(self, jobs: list[UpdateJob], progress: str | None = None) -> list[TrainedAdapter]: ...

    def generate(
        self, prompts: list[str], adapters: list[TrainedAdapter | None], **kwargs: Any
    ) -> list[str]: ...

    def score(
        self,
        prompts: list[str],
        continuations: list[str],
        adapters: list[TrainedAdapter | None],
        **kwargs: Any,
    ) -> list[tuple[float, int]]: ...


class UpdateFailed(RuntimeError):
    pass


class LoraUpdater:
    def __init__(self, lm: LM, cfg: AdaptConfig):
        self.lm, self.cfg = lm, cfg
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        # Injects LoRA layers into lm.model in place; the base weights stay frozen.
        self.peft = get_peft_model(lm.model, lora, adapter_name=ADAPTER)
        self.layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]
        self.params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        self._enable(False)  # outside an update, the model is the golden copy

    def _enable(self, on: bool) -> None:
        for layer in self.layers:
            layer.enable_adapters(on)

    @contextlib.contextmanager
    def applied(self, adapter: TrainedAdapter | None) -> Iterator[None]:
        """Inside this block the model is base + `adapter` (None: the golden copy alone)."""
        if adapter is None:
            yield
            return
        check_applicable([adapter])
        set_peft_model_state_dict(self.peft, adapter.state, adapter_name=ADAPTER)
        self._enable(True)
        try:
            yield
        finally:
            self._enable(False)

    def generate(self, prompts: list[str], adapters: list[TrainedAdapter | None], **kwargs: Any) -> list[str]:
        """`seal.models.generate` with adapters[i] applied to prompt i, one adapter at a time."""
        return self._per_adapter(adapters, lambda idx: generate(self.lm, [prompts[i] for i in idx], **kwargs))

    def score(
        self,
        prompts: list[str],
        continuations: list[str],
        adapters: list[TrainedAdapter | None],
        **kwargs: Any,
    ) -> list[tuple[float, int]]:
        """`seal.models.continuation_logprobs` with adapters[i] applied to pair i, one adapter at a time."""
        return self._per_adapter(
            adapters,
            lambda idx: continuation_logprobs(
                self.lm, [prompts[i] for i in idx], [continuations[i] for i in idx], **kwargs
            ),
        )

    def _per_adapter(self, adapters: list[TrainedAdapter | None], run: Callable[[list[int]], list]) -> list:
        """`run(rows)` once per distinct adapter, on the rows that use it, with that adapter applied."""
        check_applicable(adapters)
        outputs: list = [None] * len(adapters)
        groups: dict[int, list[int]] = {}
        for i, adapter in enumerate(adapters):
            groups.setdefault(id(adapter), []).append(i)
        for idx in groups.values():
            with self.applied(adapters[idx[0]]):
                for i, value in zip(idx, run(idx), strict=True):
                    outputs[i] = value
        return outputs

    def train(self, jobs: list[UpdateJob], progress: str | None = None) -> list[TrainedAdapter]:
        """One adapter per job. A failed update (non-finite loss, out of memory) is recorded in its result and
        carries no weights; the other jobs go on."""
        adapters = []
        with checkpointing(self.lm.model, self.cfg.gradient_checkpointing):
            for job in tqdm(jobs, desc=progress, disable=progress is None, leave=False):
                result = self._train_one(job)
                state = None
                if result.error is None:
                    state = {k: v.detach().to("cpu", copy=True) for k, v in self._state().items()}
                adapters.append(TrainedAdapter(job.key, result, state))
        return adapters

    def _state(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.peft, adapter_name=ADAPTER)

    @torch.no_grad()
    def merge(self, adapter: TrainedAdapter) -> None:
        """Add `adapter` into the base weights for good (W += alpha/rank * B A in every adapted layer): the
        model alone then computes what base + adapter computed. Afterwards the base is no longer the golden
        copy; later adapters train on top of the merged model."""
        check_applicable([adapter])
        for name, layer in self.peft.named_modules():
            if isinstance(layer, LoraLayer):
                merge_lora(
                    layer.get_base_layer().weight,
                    adapter.state[f"{name}.lora_A.weight"],
                    adapter.state[f"{name}.lora_B.weight"],
                    layer.scaling[ADAPTER],
                )

    def reset(self, seed: int) -> None:
        """A fresh adapter: A random from `seed`, B zero (so training starts from the base model)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.layers:
                layer.reset_lora_parameters(ADAPTER, True)

    def _train_one(self, job: UpdateJob) -> UpdateResult:
        cfg, lm = self.cfg, self.lm
        result = UpdateResult(job.key)
        start = time.perf_counter()
        self.reset(job.seed)
        lr, epochs = job.settings(cfg)
        optimizer = adamw(self.params, lr, cfg.weight_decay)
        batches = tokenize(lm, job.sequences, cfg.max_length, job.prefixes)
        order_rng = random.Random(job.seed)
        self._enable(True)
        self.peft.train()
        try:
            if not batches:
                raise UpdateFailed(no_rows(cfg.max_length))
            # Entered only now: the layers of a disabled adapter need no gradient, so they would be cast too.
            with self.lm.frozen_casts():
                for epoch in range(epochs):
                    order = list(range(len(batches)))
                    order_rng.shuffle(order)
                    losses = []
                    for step in range(0, len(order), cfg.batch_size):
                        rows = [batches[i] for i in order[step : step + cfg.batch_size]]
                        ids, mask = collate([r.ids for r in rows], lm)
                        # Padding never counts in the loss. (The original code padded every sequence to 2,048
                        # tokens and left the pads in the loss, which silently shrank the gradient.) Neither
                        # does a prefix.
                        labels = ids.masked_fill(mask == 0, -100)
                        for i, r in enumerate(rows):
                            labels[i, : r.learn_from] = -100
                        with lm.autocast():
                            loss = self.peft(input_ids=ids, attention_mask=mask, labels=labels).loss
                        if not math.isfinite(loss.item()):
                            raise UpdateFailed(f"non-finite loss {loss.item()} at epoch {epoch}, step {step}")
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        losses.append(loss.item())
                        result.tokens += sum(r.targets for r in rows)
                    result.epoch_losses.append(sum(losses) / len(losses))
        except UpdateFailed as err:
            result.error = str(err)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            result.error = "out of memory"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            self.peft.eval()
            self._enable(False)
            optimizer.zero_grad(set_to_none=True)
        result.seconds = time.perf_counter() - start
        return result


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing of the model's decoder layers while training, if `enabled`. transformers
    also makes the embeddings' output require grad then; that is undone too, so that later updates without
    checkpointing do not carry it."""
    if not enabled:
        yield
        return
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    disable = getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)
    enable({"use_reentrant": False})
    try:
        yield
    finally:
        disable()
        if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW for one adapter's ~400 small tensors, as one fused kernel per step on CPU and CUDA. Unfused, each
    step launches several small operations per tensor: on the 2-core CPU, fusing it made an update of the
    bench's jobs about 12 % faster (benchmarks/README.md). The arithmetic is AdamW's either way."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


class SharedCountAdamW:
    """`torch.optim.AdamW(fused=True)`'s step without its bookkeeping: the same kernel (`torch._fused_adamw_`)
    with the same arguments, so the same bits. Per step, torch.optim goes over every tensor in Python and
    adds one to each tensor's own step count, several small operations each; for an adapter's ~400 tensors
    that cost about 3 ms a step on the 2-core CPU, three times the kernel's own overhead. Here the tensors
    that have taken as many steps share one count tensor (all of them, unless a tensor had no gradient in
    some step). For one device's tensors of one float dtype (see `batched_adamw`)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
        self.params, self.lr, self.weight_decay = list(params), lr, weight_decay
        self.betas, self.eps = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults
        self.exp_avgs: list[torch.Tensor | None] = [None] * len(self.params)  # made at a tensor's first step
        self.exp_avg_sqs: list[torch.Tensor | None] = [None] * len(self.params)
        self.steps = [0] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        stepping = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not stepping:
            return
        for i in stepping:
            if self.exp_avgs[i] is None:
                self.exp_avgs[i] = torch.zeros_like(self.params[i], memory_format=torch.preserve_format)
                self.exp_avg_sqs[i] = torch.zeros_like(self.params[i], memory_format=torch.preserve_format)
            self.steps[i] += 1
        device = self.params[stepping[0]].device
        taken = {self.steps[i] for i in stepping}  # torch keeps fused AdamW's step counts in float32
        counts = {n: torch.full((), float(n), dtype=torch.float32, device=device) for n in taken}
        torch._fused_adamw_(
            [self.params[i] for i in stepping],
            [self.params[i].grad for i in stepping],
            [self.exp_avgs[i] for i in stepping],
            [self.exp_avg_sqs[i] for i in stepping],
            [],
            [counts[self.steps[i]] for i in stepping],
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=self.weight_decay,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            raise ValueError("SharedCountAdamW only drops gradients (set_to_none=True)")
        for param in self.params:
            param.grad = None


def batched_adamw(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float
) -> SharedCountAdamW | torch.optim.AdamW:
    """The batched updater's AdamW for one slot: SharedCountAdamW where torch's fused kernel takes the
    tensors (one CPU or CUDA device, one of float32, bf16 or fp16), else `adamw`."""
    kinds = {(p.device.type, p.dtype) for p in params}
    fits = (
        hasattr(torch, "_fused_adamw_")
        and len({p.device for p in params}) == 1
        and len(kinds) == 1
        and next(iter(kinds))[0] in ("cpu", "cuda")
        and next(iter(kinds))[1] in (torch.float32, torch.bfloat16, torch.float16)
    )
    return SharedCountAdamW(params, lr, weight_decay) if fits else adamw(params, lr, weight_decay)


def check_applicable(adapters: list[TrainedAdapter | None]) -> None:
    for adapter in adapters:
        if adapter is not None and adapter.state is None:
            raise ValueError(
                f"adapter {adapter.key!r} failed to train ({adapter.result.error}); nothing to apply"
            )


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """weight += scaling * b @ a in place, summed in float32 and rounded once to the weight's dtype."""
    delta = scaling * (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32))
    weight.copy_(weight.float() + delta)


def make_updater(lm: LM, cfg: AdaptConfig) -> Updater:
    """The batched multi-adapter updater (default), or PEFT one adapter at a time (adapt.batch_adapters=false:
    the reference path, and the fallback where K adapters do not fit in memory)."""
    from seal.multilora import MultiLoraUpdater, fit_capacity  # it builds on this module's types

    if cfg.epochs < 1:
        raise ValueError(f"adapt.epochs={cfg.epochs}: an update needs at least one epoch")
    if cfg.compile and not cfg.batch_adapters:
        raise ValueError("adapt.compile applies to the batched updater: set adapt.batch_adapters=true")
    return MultiLoraUpdater(lm, cfg, fit_capacity(lm, cfg)) if cfg.batch_adapters else LoraUpdater(lm, cfg)


def tokenize(
    lm: LM, sequences: list[str], max_length: int | None, prefixes: list[str] | None = None
) -> list[Row]:
    """Each training sequence as a row, ending with EOS so the model also learns where text ends; with
    `prefixes`, each row starts with its prefix's tokens, which have no loss. Rows are cut at `max_length`
    (None: not cut); a row left with no token to learn (its prefix alone that long) is dropped, since its
    loss would be 0/0."""
    if not sequences:
        return []
    tok = lm.tokenizer
    encoded = tok([s + tok.eos_token for s in sequences], add_special_tokens=False)["input_ids"]
    if prefixes is None:
        rows = [Row(ids[:max_length]) for ids in encoded]
    else:
        heads = tok(list(prefixes), add_special_tokens=False)["input_ids"]
        rows = [Row((h + ids)[:max_length], max(1, len(h))) for h, ids in zip(heads, encoded, strict=True)]
    kept = [r for r in rows if r.targets]
    if len(kept) < len(rows):
        log.warning(
            "%d of %d training sequences dropped: no token to learn within max_length=%s",
            len(rows) - len(kept),
            len(rows),
            max_length,
        )
    return kept


def no_rows(max_length: int) -> str:
    """Why a job has nothing to train on (see `tokenize`)."""
    return f"no training sequence with a token to learn within max_length={max_length} tokens"


def collate(rows: list[list[int]], lm: LM) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch; the mask marks real tokens."""
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=lm.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=lm.device)
    return ids, mask
