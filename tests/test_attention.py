"""seal.attention must compute what SDPA computes for a packed pass, and hand everything else to SDPA."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from seal import attention
from seal.adapt import UpdateJob
from seal.attention import MAX_TOKENS, NAME, block_causal_mask, packed_attention, packed_attention_forward
from seal.config import AdaptConfig
from seal.multilora import MultiLoraUpdater
from tests.conftest import DEVICE, load_tiny

HEADS, KV_HEADS, WIDTH = 6, 2, 16


class Module(torch.nn.Module):
    """What transformers' attention functions read from the attention layer."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def packed_inputs(length: int, rows: int, dtype: torch.dtype = torch.float32):
    """Query, key and value of a pass of `rows` rows end to end, and its block-diagonal causal mask."""
    generator = torch.Generator().manual_seed(length)
    q, k, v = (
        torch.randn(1, heads, length, WIDTH, generator=generator).to(dtype).requires_grad_()
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    )
    row = torch.arange(length) * rows // length
    return q, k, v, block_causal_mask(row)


def sdpa(q, k, v, mask):
    """The reference: torch's SDPA, key/value heads shared by their query heads, as [1, T, heads, width]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize(("length", "rows"), [(1, 1), (37, 3), (MAX_TOKENS, 5)])
def test_a_packed_pass_gets_sdpa_s_output_and_gradients(length, rows):
    q, k, v, mask = packed_inputs(length, rows)
    got, weights = packed_attention_forward(Module(), q, k, v, mask)
    assert weights is None and got.shape == (1, length, HEADS, WIDTH)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), upstream)
    want = sdpa(q, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), upstream), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_in_bf16_the_scores_are_float32_and_the_output_is_bf16_within_its_rounding():
    q, k, v, mask = packed_inputs(64, 2, torch.bfloat16)
    got, _ = packed_attention_forward(Module(), q, k, v, mask)
    assert got.dtype == torch.bfloat16
    want = sdpa(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


def test_the_layers_of_a_pass_share_one_bias_built_from_their_mask():
    """Every layer of a pass gets the same mask tensor: its bias is built once and reused; another mask, or
    this one changed in place, gets a bias of its own, each equal to the mask's."""
    mask = block_causal_mask(torch.tensor([0, 0, 0, 1, 1]))
    bias = attention.mask_bias(mask, 3)
    assert attention.mask_bias(mask, 3) is bias
    assert bias.shape == (15, 5) and torch.equal(bias.isfinite(), mask[0, 0].repeat(3, 1))
    other = block_causal_mask(torch.tensor([0, 1, 1, 1, 1]))
    assert torch.equal(attention.mask_bias(other, 3).isfinite(), other[0, 0].repeat(3, 1))
    assert attention.mask_bias(mask, 2).shape == (10, 5)
    mask[0, 0, 4, 0] = True
    assert attention.mask_bias(mask, 2)[4, 0] == 0


def test_the_first_keys_of_a_packed_pass_come_from_its_mask_and_from_no_other_mask():
    """`block_starts` reads each token's first key from a block-diagonal causal mask; a mask with a hole, one
    that lets a token see later tokens, and one with a token that sees nothing are not a packed pass's."""
    mask = block_causal_mask(torch.tensor([0, 0, 0, 1, 1, 2]))
    assert attention.block_starts(mask).tolist() == [0, 0, 0, 3, 3, 5]
    hole, seen_later, blind = mask.clone(), mask.clone(), mask.clone()
    hole[0, 0, 2, 1] = False
    seen_later[0, 0, 1, 2] = True
    blind[0, 0, 4] = False
    for other in (hole, seen_later, blind):
        assert attention.block_starts(other) is None


def test_the_fused_attention_takes_packed_passes_whose_rows_fit_and_nothing_else():
    """`fusable` hands a packed pass under bf16 autocast to the one-node attention, also a pass longer than
    MAX_TOKENS whose rows are not; a row longer than MAX_TOKENS, a cache, no autocast, another mask or
    another implementation go to the module's own forward."""
    config = SimpleNamespace(_attn_implementation=NAME, sliding_window=None)
    module = SimpleNamespace(config=config, training=True, attention_dropout=0.0, head_dim=WIDTH)

    def decision(rows: list[int], autocast: bool = True, **change) -> torch.Tensor | None:
        length = sum(rows)
        mask = block_causal_mask(torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows)))
        rotary = (torch.zeros(1, length, WIDTH), torch.zeros(1, length, WIDTH))
        args = dict(hidden_states=torch.zeros(1, length, 8), position_embeddings=rotary, attention_mask=mask)
        args = {**args, "kwargs": {}, **change}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return attention.fusable(module, **args)

    half = MAX_TOKENS // 2 + 10
    assert decision([half, half]).tolist() == [0] * half + [half] * half
    assert decision([MAX_TOKENS + 1]) is None
    assert decision([5, 7], kwargs={"cache": object()}) is None
    assert decision([5, 7], attention_mask=torch.ones(1, 1, 12, 12, dtype=torch.bool)) is None
    assert decision([5, 7], autocast=False) is None
    config._attn_implementation = "sdpa"
    assert decision([5, 7]) is None


@pytest.mark.parametrize(
    "case",
    ["longer than MAX_TOKENS", "two rows in a batch", "no mask", "dropout", "a query shorter than keys"],
)
def test_what_is_not_a_packed_pass_goes_to_sdpa(case, monkeypatch):
    calls = []

    def recorded(*args, **kwargs):
        calls.append(case)
        return "sdpa"

    monkeypatch.setattr(attention, "sdpa_attention_forward", recorded)
    q, k, v, mask = packed_inputs(MAX_TOKENS + 1 if case == "longer than MAX_TOKENS" else 8, 2)
    kwargs = {}
    if case == "two rows in a batch":
        q, k, v, mask = (t.expand(2, *t.shape[1:]) for t in (q, k, v, mask))
    elif case == "no mask":
        mask = None
    elif case == "dropout":
        kwargs["dropout"] = 0.1
    elif case == "a query shorter than keys":
        q, mask = q[:, :, -1:], mask[:, :, -1:]
    assert packed_attention_forward(Module(), q, k, v, mask, **kwargs) == "sdpa"
    assert calls == [case]


@pytest.mark.skipif(DEVICE != "cpu", reason="packed_attention leaves a GPU's attention as it is")
def test_packed_attention_switches_sdpa_on_a_cpu_for_the_block_only():
    lm = load_tiny()
    assert lm.model.config._attn_implementation == "sdpa"
    with packed_attention(lm):
        assert lm.model.config._attn_implementation == NAME
    assert lm.model.config._attn_implementation == "sdpa"
    lm.model.set_attn_implementation("eager")
    with packed_attention(lm):
        assert lm.model.config._attn_implementation == "eager"


@pytest.mark.skipif(DEVICE != "cpu", reason="packed_attention leaves a GPU's attention as it is")
def test_the_batched_updater_trains_with_it_on_a_cpu_and_generates_with_sdpa():
    lm = load_tiny()
    updater = MultiLoraUpdater(lm, AdaptConfig(rank=4, alpha=8, epochs=1), capacity=2)
    seen = []
    attention_layer = lm.model.model.layers[0].self_attn
    attention_layer.register_forward_hook(
        lambda module, args, out: seen.append(module.config._attn_implementation)
    )
    adapters = updater.train(
        [UpdateJob("a", ["Port Vellan is a harbour town."], 0), UpdateJob("b", ["So?"], 1)]
    )
    assert seen and set(seen) == {NAME}
    seen.clear()
    updater.generate(["Where is Port Vellan?"], adapters[:1], max_new_tokens=2)
    assert seen and set(seen) == {"sdpa"}
