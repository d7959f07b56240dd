"""A cap on the activations that the batched updater's lanes hold at once (`adapt.lane_budget`).

Each lane of `seal.multilora.MultiLoraUpdater.train` runs its own passes. A pass holds more and more
activations through its forward and gives them back through its backward. Two lanes running freely
sometimes reach the ends of their forwards together, and then the process holds two passes' activations:
over a whole update of the bench's jobs, that put the peak for 4 adapters at 1.6x that of one.

The budget counts token-layers: a pass of T tokens takes T as it enters each decoder layer and gives it
back when that layer's backward is done, T x layers in all. The lanes in their forward queue in the order
their passes began. The first may take whatever the others leave; each later one only what is left once
the lanes ahead of it have taken all they will need. So every lane ahead can finish its forward, and a
lane that waits always waits for memory some other lane will give back: the lanes cannot deadlock, and
they never hold more than the budget together (a pass needing more than all of it runs alone). In effect
one lane runs its forward while another runs its backward. Only the timing changes: each lane computes
what it would compute alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn


class ActivationBudget:
    """`passes` passes' token-layers, a pass being `tokens` tokens through `layers` layers, or as many tokens
    as the longest pass begun so far (a row longer than `adapt.pack_length` is a pass of its own: few-shot
    ARC's thousands of tokens would otherwise run alone, one lane at a time)."""

    def __init__(self, passes: float, tokens: int, layers: int):
        self.passes, self.tokens, self.layers = passes, tokens, layers
        self.held: dict[int, int] = {}  # lane -> token-layers it holds
        # The lanes in their forward, in the order they began, and what each has still to take.
        self.needs: dict[int, int] = {}
        self.peak = 0  # the most token-layers held at once
        self._changed = threading.Condition()
        self._local = threading.local()

    @contextlib.contextmanager
    def lane(self, lane: int) -> Iterator[None]:
        """Inside this block the calling thread's passes count as lane `lane`'s."""
        self._local.lane = lane
        try:
            yield
        finally:
            del self._local.lane

    @property
    def capacity(self) -> int:
        return round(self.passes * self.tokens * self.layers)

    @property
    def current(self) -> int | None:
        return getattr(self._local, "lane", None)

    @contextlib.contextmanager
    def pass_(self, tokens: int) -> Iterator[None]:
        """One pass of `tokens` tokens by the calling lane (none: nothing is counted). At its end, with its
        backward or without one (a failed loss, an error), all it still holds is freed."""
        lane = self.current
        if lane is None:
            yield
            return
        with self._changed:
            self.tokens = max(self.tokens, tokens)
            self.needs[lane] = tokens * self.layers
        try:
            yield
        finally:
            with self._changed:
                self.held[lane] = 0
                self.needs.pop(lane, None)
                self._changed.notify_all()

    def may_take(self, lane: int, amount: int) -> bool:
        """Whether `lane` may take `amount` now: all held stays within the capacity beside what the lanes
        ahead of it in the queue will still take. The first lane of the queue may go over it when no other
        lane holds anything."""
        queue = list(self.needs)
        ahead = queue[: queue.index(lane)]
        total = sum(self.held.values()) + amount + sum(self.needs[other] for other in ahead)
        if total <= self.capacity:
            return True
        return not ahead and not any(held for other, held in self.held.items() if other != lane)

    def take(self, amount: int) -> int | None:
        """Takes `amount` for the calling lane's pass once `may_take`; returns the lane (None: no lane or no
        pass is counting, nothing taken)."""
        lane = self.current
        if lane is None or lane not in self.needs:
            return None
        with self._changed:
            self._changed.wait_for(lambda: self.may_take(lane, amount))
            self.held[lane] = self.held.get(lane, 0) + amount
            self.needs[lane] = max(0, self.needs[lane] - amount)
            self.peak = max(self.peak, sum(self.held.values()))
        return lane

    def give_back(self, lane: int, amount: int) -> None:
        with self._changed:
            self.held[lane] = max(0, self.held.get(lane, 0) - amount)
            self._changed.notify_all()

    def backward_begins(self) -> None:
        """The calling lane's forward is done: it takes nothing more in this pass and leaves the queue."""
        if (lane := self.current) is not None:
            with self._changed:
                self.needs.pop(lane, None)
                self._changed.notify_all()


class _GiveBack(torch.autograd.Function):
    """The identity, whose backward (run once everything the layer computed from its input has its
    gradient, so the layer's saved tensors are freed) gives the layer's share back to the budget."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, budget: ActivationBudget, lane: int, amount: int):
        ctx.budget, ctx.lane, ctx.amount = budget, lane, amount
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.budget.give_back(ctx.lane, ctx.amount)
        return grad, None, None, None


@contextlib.contextmanager
def budgeted(layers: list[nn.Module], budget: ActivationBudget) -> Iterator[None]:
    """Inside this block each of `layers` (the decoder layers), entered by a lane's counted pass that needs
    gradients, takes its tokens from `budget` first and gives them back after its backward. (The first
    layer's input needs no gradient, so its share comes back only at the end of the pass.)"""

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        counted = entering(budget, hidden)
        if counted is hidden:
            return None
        if args:
            return (counted, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": counted}

    handles = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def entering(budget: ActivationBudget, hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` entering a decoder layer: for a lane's counted pass that needs gradients, its tokens taken
    from `budget` first (waiting until `may_take`) and given back after the layer's backward; else `hidden`
    itself. `budgeted`'s hooks call it, and so does `seal.multilora.packed_layers`, which calls no layer's
    forward."""
    if not torch.is_grad_enabled():
        return hidden
    amount = hidden.shape[:-1].numel()
    lane = budget.take(amount)
    if lane is None:
        return hidden
    return _GiveBack.apply(hidden, budget, lane, amount)
