"""The C++ kernels of the batched updater (seal/kernels/cpu.cpp) against PyTorch's own operations."""

import dataclasses
import logging
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from seal import attention, decoding, kernels, lane_budget, multilora
from seal.config import AdaptConfig
from seal.models import cpu_supports_bf16
from seal.multilora import (
    AdapterRouting,
    MultiLoraLinear,
    MultiLoraUpdater,
    NormInComputeDtype,
    TokenLosses,
    kernel_tensors,
    norms_in_compute_dtype,
    transposed,
)
from tests.conftest import DEVICE
from tests.test_multilora import CFG, JOBS, MIXED_CFG, MIXED_JOBS, tiny_fp32

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernel is for CPUs")
# Rows 0-4 through slot 0, 5-7 through no adapter, 8-16 through slot 2 (slot 1 is not in this pass).
RUNS = [(0, 5), (-1, 3), (2, 9)]


@pytest.fixture(scope="module")
def kernel():
    """Built here if `make setup` has not built it yet; the tests need the compiler the machine has."""
    return kernels.cpu_kernels(required=True)


@pytest.fixture
def avx512_kernel(kernel):
    if not kernel.avx512_available():
        pytest.skip("swiglu, rms_norm and packed_attention are written for AVX-512")
    return kernel


def counted(function, calls: list):
    """`function`, appending each call's arguments to `calls`."""

    def count(*args):
        calls.append(args)
        return function(*args)

    return count


class Recording:
    """The kernel, with its function `name` recording the dtype of each call's result in `seen`."""

    def __init__(self, kernel, name: str, seen: list):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getattr__(self, attr: str):
        function = getattr(self.kernel, attr)
        if attr != self.name:
            return function

        def recorded(*args):
            out = function(*args)
            self.seen.append(out.dtype)
            return out

        return recorded


def layer_and_input(bias: bool, dtype: torch.dtype, per_token: bool, sizes=(48, 40), rank: int = 4):
    torch.manual_seed(0)
    routing = AdapterRouting()
    base = nn.Linear(*sizes, bias=bias).requires_grad_(False)
    layer = MultiLoraLinear(base, 3, AdaptConfig(rank=rank), routing)
    with torch.no_grad():
        for p in [*layer.lora_A, *layer.lora_B]:
            p.normal_()  # B starts at zero in training; here every product must count
    slots = torch.tensor([slot for slot, n in RUNS for _ in range(n)])
    if per_token:  # one packed row of 17 tokens, each routed on its own
        x, ids = torch.randn(1, 17, sizes[0]), slots[None, :]
    else:  # 17 rows of 2 tokens each, routed row by row
        x, ids = torch.randn(17, 2, sizes[0]), slots
    routing.set(ids)
    return layer, x.to(dtype).requires_grad_(True)


def forward_backward(layer: MultiLoraLinear, x: torch.Tensor, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    params = [layer.lora_A[0], layer.lora_A[2], layer.lora_B[0], layer.lora_B[2]]
    return [y, *torch.autograd.grad(y, [x, *params], grad)], layer.lora_A[1].grad


def use_kernel(layer: MultiLoraLinear, kernel, dtype: torch.dtype, packed: bool) -> None:
    """What MultiLoraUpdater.train gives each adapted layer while it runs the kernel."""
    base = layer.base_layer
    layer.kernel_frozen = kernel_tensors(base, base.weight.detach().to(dtype), packed)
    layer.kernel = kernel


@pytest.mark.parametrize("per_token", [True, False], ids=["tokens", "rows"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize(
    ("x_dtype", "autocast"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
    ids=["float32", "float32 input, bf16 autocast", "bf16 input, bf16 autocast"],
)
def test_the_kernel_computes_what_pytorch_computes(kernel, per_token, bias, x_dtype, autocast):
    """Without packed weights, the kernel's output and the gradients of the input and of every adapter in the
    pass equal autograd's of MultiLoraLinear's own operations: in float32 bit for bit; under bf16 autocast
    within one bf16 rounding, since the kernel adds each adapter's product to the base product inside the
    matrix product and rounds the sum to bf16 once, where autocast rounds each term."""
    layer, x = layer_and_input(bias, x_dtype, per_token)
    want, _ = forward_backward(layer, x, autocast)
    use_kernel(layer, kernel, torch.bfloat16 if autocast else torch.float32, packed=False)
    got, unused_grad = forward_backward(layer, x, autocast)
    for name, g, w in zip(["output", "x", "A0", "A2", "B0", "B2"], got, want, strict=True):
        assert g.dtype == w.dtype, name
        if autocast:
            ulp, scale = 2**-7, w.float().abs().max().item()  # bf16 keeps 8 significant bits
            torch.testing.assert_close(g.float(), w.float(), rtol=ulp, atol=ulp * scale, msg=name)
        else:
            assert torch.equal(g, w), name
    assert unused_grad is None  # slot 1 took no part in the pass


def use_products(kernel, products: str) -> None:
    """The micro-kernel's products through oneDNN's (AMX) or the extension's own (AVX-512 BF16); a skip where
    this CPU has not that one."""
    offered = kernel.onednn_micro_kernel() if products == "oneDNN" else kernel.avx512_bf16_available()
    if not offered:
        pytest.skip(f"this CPU or torch does not offer the micro-kernel's products through {products}")
    kernel.set_own_products(products == "own")


@pytest.fixture(params=["oneDNN", "own"])
def micro_kernel(kernel, request):
    """The kernel where a bf16 run's adapter products go through oneDNN's micro-kernel (AMX) or the
    extension's own kernel over the same layout (AVX-512 BF16, where oneDNN offers none)."""
    use_products(kernel, request.param)
    yield kernel
    kernel.set_brgemm(True)
    kernel.set_own_products(False)


@pytest.mark.parametrize("per_token", [True, False], ids=["tokens", "rows"])
def test_adapters_through_onednn_s_micro_kernel_compute_what_autocast_computes(micro_kernel, per_token):
    """Sizes the micro-kernel takes (multiples of 16) and runs of odd length: with it, no at::mm is left for
    the adapters, and the output and every gradient are within bf16 rounding of autocast's, as through at::mm
    (A's and B's gradients are summed in float32 there, not rounded to bf16 first)."""
    layer, x = layer_and_input(False, torch.float32, per_token, sizes=(64, 48), rank=16)
    want, _ = forward_backward(layer, x, autocast=True)
    use_kernel(layer, micro_kernel, torch.bfloat16, packed=True)
    for micro in (False, True):
        micro_kernel.set_brgemm(micro)
        with torch.profiler.profile() as prof:
            got, unused_grad = forward_backward(layer, x, autocast=True)
        products = sum(e.name in ("aten::mm", "aten::addmm_") for e in prof.events())
        assert (products == 0) == micro, products
        for name, g, w in zip(["output", "x", "A0", "A2", "B0", "B2"], got, want, strict=True):
            assert g.dtype == w.dtype, name
            assert (g.float() - w.float()).abs().max() <= 0.02 * w.float().abs().max(), (micro, name)
        assert unused_grad is None


@pytest.mark.skipif(not cpu_supports_bf16(), reason="the updater packs bf16 weights on CPUs with fast bf16")
def test_packed_weights_stay_within_bf16_rounding(kernel):
    """Under bf16 autocast with oneDNN's packed weights (as the updater runs it on a CPU with fast bf16), the
    packed products are the ones used, and the results differ from autocast's by bf16 rounding at most."""
    layer, x = layer_and_input(False, torch.float32, per_token=True)
    want, _ = forward_backward(layer, x, autocast=True)
    use_kernel(layer, kernel, torch.bfloat16, packed=True)
    with torch.profiler.profile() as prof:
        got, _ = forward_backward(layer, x, autocast=True)
    assert sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events()) == 2  # forward, input's gradient
    for name, g, w in zip(["output", "x", "A0", "A2", "B0", "B2"], got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert (g.float() - w.float()).abs().max() <= 0.02 * w.float().abs().max(), name  # bf16: 8 bits


@pytest.fixture
def own_products(kernel):
    """The kernel where it lays frozen bf16 weights out for its own products (AVX-512 BF16 without AMX)."""
    if not kernel.own_frozen_products():
        pytest.skip("this CPU lays frozen weights out through oneDNN (AMX) or has no AVX-512 BF16")
    return kernel


@pytest.mark.parametrize(("inputs", "outputs", "rows"), [(64, 48, 17), (1056, 80, 7), (32, 1040, 30)])
def test_weights_laid_out_for_our_own_products_multiply_within_bf16_rounding_on_any_threads(
    own_products, inputs, outputs, rows
):
    """`laid_weight` and the products by it (`packed_product` of a 1-D layout): x W^T and g W against float32
    products of the same bf16 numbers, each within one bf16 rounding of the largest value, with blocks of 16
    to 64 columns and an inner size long enough to be summed in chunks (1056 > 1024); bit for bit the same on
    one thread and on two (each block of columns is summed by one thread)."""
    generator = torch.Generator().manual_seed(inputs)
    weight = torch.randn(outputs, inputs, generator=generator).bfloat16()
    x = torch.randn(rows, inputs, generator=generator).bfloat16()
    g = torch.randn(rows, outputs, generator=generator).bfloat16()
    base = nn.Linear(inputs, outputs, bias=False)
    frozen = kernel_tensors(base, weight, pack=True, kernel=own_products)
    assert [t.dim() for t in frozen[2:]] == [1, 1]  # our layout, not oneDNN's
    for product, a, b in ((frozen[2], x, weight.t()), (frozen[3], g, weight)):
        want = a.float() @ b.float()
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                results.append(own_products.laid_product(a, product))
            finally:
                torch.set_num_threads(1)
        got = results[0]
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert torch.equal(results[0], results[1])
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())


def test_a_layer_through_weights_laid_out_for_our_own_products_trains_as_autocast_does(own_products):
    """The adapted layer with its frozen weight in our layout, forward and backward under bf16 autocast: no
    oneDNN product is left, and the output and every gradient are within bf16 rounding of autocast's."""
    layer, x = layer_and_input(False, torch.float32, per_token=True, sizes=(64, 48), rank=16)
    want, _ = forward_backward(layer, x, autocast=True)
    base = layer.base_layer
    layer.kernel_frozen = kernel_tensors(base, base.weight.detach().bfloat16(), True, kernel=own_products)
    layer.kernel = own_products
    with torch.profiler.profile() as prof:
        got, _ = forward_backward(layer, x, autocast=True)
    assert not any(e.name in ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm") for e in prof.events())
    for name, g, w in zip(["output", "x", "A0", "A2", "B0", "B2"], got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert (g.float() - w.float()).abs().max() <= 0.02 * w.float().abs().max(), name


@pytest.mark.parametrize("size", [0.1, 0.3], ids=["terms alike", "adapters larger"])
def test_runs_terms_are_summed_into_the_laid_out_product_and_rounded_once(own_products, size):
    """With its frozen weight in our layout, the layer adds each run's adapter term to the frozen product's
    float32 sums and rounds the sum to bf16 once, for the output and for x's gradient; the rows of no adapter
    are the frozen product alone. Against float64 sums of the same bf16 numbers (x A^T and its gradient
    rounded to bf16 as the kernel rounds them), almost every element is the nearest bf16 and none is further
    than one bf16 step. Rounding the frozen product and the term apart and then their sum (the path of
    oneDNN's layouts) lands on the nearest bf16 for only about 85 % of them, and much further where the two
    cancel."""
    layer, x = layer_and_input(False, torch.bfloat16, per_token=True, sizes=(64, 48), rank=16)
    with torch.no_grad():
        for p in [*layer.lora_A, *layer.lora_B]:
            p.mul_(size)  # 0.1: the adapters' terms about as large as the frozen product's
    base = layer.base_layer
    layer.kernel_frozen = kernel_tensors(base, base.weight.detach().bfloat16(), True, kernel=own_products)
    layer.kernel = own_products
    (y, dx, *_), _ = forward_backward(layer, x, autocast=True)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)  # forward_backward's
    weight = base.weight.detach().bfloat16().double()
    xs, g = x.detach()[0].double(), grad[0].double()
    want_y, want_dx = xs @ weight.T, g @ weight
    start = 0
    for slot, n in RUNS:
        rows = slice(start, start + n)
        start += n
        if slot < 0:
            continue
        a = layer.lora_A[slot].detach().bfloat16().double()
        b = (layer.lora_B[slot].detach() * layer.scaling).bfloat16().double()  # scaled, then laid out in bf16
        want_y[rows] += (xs[rows] @ a.T).float().bfloat16().double() @ b.T
        want_dx[rows] += (g[rows] @ b).float().bfloat16().double() @ a
    for name, got, want in (("output", y[0], want_y), ("x", dx[0], want_dx)):
        nearest = want.float().bfloat16()
        assert got.dtype == torch.bfloat16, name
        assert (got == nearest).float().mean() >= 0.99, name
        assert ((got.double() - want).abs() <= 2**-8 * want.abs() + 1e-6).all(), name


def test_without_gradients_no_node_is_built_and_few_rows_go_through_float32_adapters(kernel):
    """Decoding and scoring run the kernel without gradients: it builds no autograd node, and a run of a few
    rows (5 and 9 here) goes through its adapter in float32, where bf16's fixed cost would dominate. In
    float32 that is the same arithmetic, bit for bit; under bf16 autocast it is the float32 result within the
    base product's bf16 rounding."""
    layer, x = layer_and_input(True, torch.float32, per_token=True)
    for dtype, autocast in ((torch.float32, False), (torch.bfloat16, True)):
        use_kernel(layer, kernel, dtype, packed=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with_grad = layer(x)
            with torch.no_grad():
                got = layer(x)
        assert with_grad.grad_fn is not None and got.grad_fn is None and got.dtype == with_grad.dtype
        if dtype == torch.float32:
            assert torch.equal(got, with_grad)
        else:
            layer.kernel = None
            with torch.no_grad():  # base and adapters all in float32
                exact = layer(x)
            assert (got.float() - exact).abs().max() <= 0.02 * exact.abs().max()
            assert (got.float() - exact).abs().max() < (with_grad.float() - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_through_stacked_adapters_computes_what_its_runs_compute(kernel, dtype):
    """One token a row, rows routed to slots 0 and 2 and to no adapter: the stacked adapters (both slots'
    columns side by side, each row's other columns zeroed) give the runs' result within float32 rounding,
    and refuse to build an autograd node."""
    layer, x = layer_and_input(True, torch.float32, per_token=False)
    x = x.detach()[:, :1]  # 17 rows of one token
    use_kernel(layer, kernel, dtype, packed=False)
    routing = layer.routing
    with torch.no_grad():
        want = layer(x)
        routing.stacked, routing.rank = True, 4
        routing.set(torch.tensor([slot for slot, n in RUNS for _ in range(n)]))
        assert routing.slots == [0, 2] and routing.mask is not None
        got = layer(x)
    assert list(layer.stacks) == [(0, 2)] and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="no backward"):
        layer(x)


def test_a_weight_laid_out_for_the_forward_only_refuses_a_backward(kernel):
    """Decoding lays out each frozen weight for the forward product only (no transpose): the same output as
    the weight as it is, and a pass with gradients is refused rather than computed wrong."""
    layer, x = layer_and_input(False, torch.float32, per_token=False)
    use_kernel(layer, kernel, torch.float32, packed=False)
    with torch.no_grad():
        want = layer(x)
    base = layer.base_layer
    layer.kernel_frozen = kernel_tensors(base, base.weight.detach(), pack=True, backward=False)
    assert len(layer.kernel_frozen) == 3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="has no backward"):
        layer(x)


def loss_and_gradient(hidden, weight, targets, autocast, **kernel):
    hidden = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = TokenLosses.apply(hidden, weight, targets, 16, *kernel.values())
    scale = torch.rand(len(targets), generator=torch.Generator().manual_seed(2))
    scale[5] = 0  # the token with a non-finite loss takes no part in the total
    (grad,) = torch.autograd.grad((losses.nan_to_num() * scale).sum(), [hidden])
    return losses.detach(), grad


@pytest.mark.parametrize(
    ("autocast", "pack"),
    [(False, False), (True, False), (True, True)],
    ids=["float32", "bf16", "bf16 laid out"],
)
def test_the_loss_kernel_computes_what_token_losses_computes(kernel, autocast, pack):
    """The loss through the frozen output projection in C++ against TokenLosses' own operations, over chunks
    of 16 of 37 tokens: each token's loss within float32 rounding of the same logits, the gradient for the
    hidden rows within the rounding of its dtype. A target far too unlikely for float32's softmax (p ~ e^-500)
    still gets its finite loss, from the logits; a row of NaN gets a NaN loss and, with no incoming gradient,
    a zero gradient."""
    if pack and not cpu_supports_bf16():
        pytest.skip("oneDNN lays out bf16 weights on CPUs with fast bf16")
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 24), torch.randn(300, 24) * 0.3
    targets = torch.randperm(300)[:37]
    weight[targets[3]] = -hidden[3]  # row 3's target logit about -24, the others a few units
    hidden[3] *= 20  # and now about -500
    hidden[5] = float("nan")
    dtype = torch.bfloat16 if autocast else torch.float32
    frozen = kernel_tensors(nn.Linear(24, 300, bias=False), weight.to(dtype), pack)
    want, want_grad = loss_and_gradient(hidden, weight.to(dtype), targets, autocast)
    got, got_grad = loss_and_gradient(hidden, weight, targets, autocast, kernel=kernel, frozen=frozen)
    assert 450 < got[3] < 600 and got[5].isnan() and got.isfinite().sum() == 36
    if pack:  # oneDNN's own products: the same logits within bf16 rounding
        torch.testing.assert_close(got, want, rtol=2e-2, atol=0.2, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got_grad[5].eq(0).all() and got_grad.isfinite().all()
    ulp = 2**-7 if autocast else 1e-5
    torch.testing.assert_close(got_grad, want_grad, rtol=ulp, atol=ulp * want_grad.abs().max().item())


def test_a_norm_handed_on_in_bf16_computes_what_the_norm_then_a_cast_computes():
    """NormInComputeDtype against transformers' RMSNorm followed by the cast the adapted layers would make:
    the same bf16 output bit for bit, and the input's gradient for the same bf16 output gradient within
    float32 rounding."""
    norm = LlamaRMSNorm(48, eps=1e-5).requires_grad_(False)
    torch.manual_seed(0)
    norm.weight.normal_()
    x = (torch.randn(2, 17, 48) * 3).requires_grad_(True)
    grad = torch.randn(2, 17, 48).to(torch.bfloat16)
    want = norm(x).to(torch.bfloat16)
    (want_grad,) = torch.autograd.grad(want, [x], grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = NormInComputeDtype.apply(x, norm.weight, norm.variance_epsilon, torch.bfloat16)
    (got_grad,) = torch.autograd.grad(got, [x], grad)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


def test_under_bf16_autocast_the_updater_trains_with_its_norms_in_bf16(kernel):
    """While the updater trains through the kernel under bf16 autocast, each frozen RMSNorm of the model hands
    its output on in bf16, through the kernel's `rms_norm` on an AVX-512 CPU, else through NormInComputeDtype;
    before and afterwards, the model's own norms in float32."""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
    norms = [m for m in lm.model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all("forward" not in vars(norm) for norm in norms)
    x = torch.randn(1, 3, norms[0].weight.shape[0])
    with norms_in_compute_dtype(lm, kernel), lm.autocast():
        assert all(norm(x).dtype == torch.bfloat16 for norm in norms)
    seen = []

    real = NormInComputeDtype.apply
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG), 2)
    updater.kernel = Recording(kernel, "rms_norm", seen)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NormInComputeDtype, "apply", lambda *a: seen.append(a[3]) or real(*a))
        adapters = updater.train(JOBS[:2])
    assert all(a.result.error is None for a in adapters)
    assert len(seen) >= len(norms) and set(seen) == {torch.bfloat16}
    assert all("forward" not in vars(norm) and norm(x).dtype == torch.float32 for norm in norms)


def test_rms_norm_computes_what_the_norm_handed_on_in_bf16_computes(avx512_kernel):
    """The kernel's norm against NormInComputeDtype, over rows whose width leaves a tail after the 16-wide
    loop: the bf16 output within one bf16 rounding, the input's gradient within float32 rounding."""
    torch.manual_seed(0)
    weight = torch.randn(50)
    x = (torch.randn(2, 17, 50) * 3).requires_grad_(True)
    grad = torch.randn(2, 17, 50).to(torch.bfloat16)
    results = []

    def in_bf16(x, weight, eps):
        return NormInComputeDtype.apply(x, weight, eps, torch.bfloat16)

    for norm in (avx512_kernel.rms_norm, in_bf16):
        out = norm(x, weight, 1e-5)
        results.append([out, *torch.autograd.grad(out, [x], grad)])
    (got, got_grad), (want, want_grad) = results
    assert got.dtype == torch.bfloat16 and got_grad.dtype == torch.float32
    ulp = 2**-7
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp * want.abs().max().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


@pytest.fixture
def swiglu(kernel):
    if not kernel.avx512_available():
        pytest.skip("swiglu is written for AVX-512")
    return kernel.swiglu


def test_swiglu_computes_silu_times_up_within_bf16_rounding(swiglu):
    """The fused silu(gate) * up and its gradients against PyTorch's silu then mul, in bf16, over a size that
    leaves a tail after the 16-wide loop: each within one bf16 rounding of the largest value. NaN and infinite
    gates give what PyTorch gives."""
    torch.manual_seed(0)
    gate, up = (torch.randn(3, 37) * 4).bfloat16(), torch.randn(3, 37).bfloat16()
    gate[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    grad = torch.randn(3, 37).bfloat16()
    results = []
    for function in (swiglu, lambda g, u: nn.functional.silu(g) * u):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        out = function(g, u)
        out.backward(grad)
        results.append([out, g.grad, u.grad])
    for name, got, want in zip(["output", "gate", "up"], *results, strict=True):
        assert got.dtype == torch.bfloat16, name
        assert torch.equal(got[0, :3].isnan(), want[0, :3].isnan()), name
        got, want = got[:, 3:].float(), want[:, 3:].float()
        ulp, scale = 2**-7, want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * scale, msg=name)


def rotary(length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary cos and sin, [1, length, width] float32."""
    angles = torch.arange(length).float()[:, None] / 500.0 ** (torch.arange(0, width, 2).float() / width)
    angles = torch.cat([angles, angles], -1)[None]
    return angles.cos(), angles.sin()


def adapted_layer(inputs: int, outputs: int, rank: int, generator: torch.Generator, gain: float = 1.0):
    """What seal.decoding.Group.of reads of a seal.multilora.MultiLoraLinear: a frozen weight (no bias) and
    three slots' adapters, B not zero."""
    weight = gain * torch.randn(outputs, inputs, generator=generator) / inputs**0.5
    base = SimpleNamespace(out_features=outputs, weight=weight, bias=None)
    a = [torch.randn(rank, inputs, generator=generator) / inputs**0.5 for _ in range(3)]
    b = [torch.randn(outputs, rank, generator=generator) / rank**0.5 for _ in range(3)]
    return SimpleNamespace(base_layer=base, lora_A=a, lora_B=b, scaling=2.0)


@pytest.mark.parametrize(
    ("rows", "n", "t"), [(3, 1, 6), (2, 5, 0)], ids=["a decoding step", "a left-padded prompt"]
)
def test_decode_layer_computes_a_llama_layer_through_each_row_s_adapter(avx512_kernel, rows, n, t):
    """One call of `decode_layer` against the same layer written out in PyTorch in float32, rounded to bf16
    where the kernel's products and nodes hand on bf16: rows through slots 0 and 2 and the base model, the
    keys and values written into the cache at t..t+n-1 and nowhere else, each token attending to its row's
    allowed positions up to its own (a padding token to none: zeros). The queries and keys are large enough
    that the attention is peaked, so that a wrong scaling, rotation or position shows."""
    generator = torch.Generator().manual_seed(rows * 10 + n)
    hidden, inner, heads, kv_heads, width, rank, slots = 64, 96, 4, 2, 16, 4, [0, 2]
    row_slots = [0, -1, 2][:rows]
    layers = {
        "q": adapted_layer(hidden, heads * width, rank, generator, gain=4.0),
        "k": adapted_layer(hidden, kv_heads * width, rank, generator, gain=4.0),
        "v": adapted_layer(hidden, kv_heads * width, rank, generator),
        "o": adapted_layer(heads * width, hidden, rank, generator),
        "gate": adapted_layer(hidden, inner, rank, generator),
        "up": adapted_layer(hidden, inner, rank, generator),
        "down": adapted_layer(inner, hidden, rank, generator),
    }
    names = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    groups = [decoding.Group.of([layers[name] for name in group], slots, torch.bfloat16) for group in names]
    mask = torch.zeros(rows, len(slots) * rank, dtype=torch.bfloat16)
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            mask[row, slots.index(slot) * rank : (slots.index(slot) + 1) * rank] = 1
    capacity = t + n + 3
    shape = (rows, kv_heads, capacity, width)
    keys, values = (torch.randn(*shape, generator=generator).bfloat16() for _ in "kv")
    allowed = torch.zeros(rows, capacity, dtype=torch.bool)
    allowed[:, : t + n] = True
    allowed[rows - 1, 0] = False  # the last row's first position is padding
    x = torch.randn(rows * n, hidden, generator=generator)
    norm_in, norm_post = (1 + 0.1 * torch.randn(hidden, generator=generator) for _ in range(2))
    positions = torch.arange(t, t + n).repeat(rows)
    cos, sin = (c[0, positions].contiguous() for c in rotary(t + n, width))

    def bf(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.bfloat16().float()

    def norm(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return bf(v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)

    def products(h: torch.Tensor, group: list[str]) -> list[torch.Tensor]:
        keep = mask.float().repeat_interleave(n, dim=0)
        outs = []
        for layer in (layers[name] for name in group):
            a = torch.cat([layer.lora_A[s] for s in slots])
            b = torch.cat([layer.lora_B[s] for s in slots], dim=1) * layer.scaling
            frozen = bf(h @ bf(layer.base_layer.weight).T)
            outs.append(bf(frozen + (bf(h @ bf(a).T) * keep) @ bf(b).T))
        return outs

    def rotate(v: torch.Tensor) -> torch.Tensor:  # [tokens, heads, width]
        half = width // 2
        turned = torch.cat([-v[..., half:], v[..., :half]], dim=-1)
        return bf(v * cos[:, None] + turned * sin[:, None])

    want_keys, want_values = keys.float().clone(), values.float().clone()
    q, k, v = products(norm(x, norm_in), names[0])
    q, k = rotate(q.view(-1, heads, width)), rotate(k.view(-1, kv_heads, width))
    v = v.view(-1, kv_heads, width)
    attended = torch.zeros(rows * n, heads, width)
    for i in range(rows * n):
        r, position = i // n, t + i % n
        want_keys[r, :, position], want_values[r, :, position] = k[i], v[i]
    for i in range(rows * n):
        r, position = i // n, t + i % n
        seen = allowed[r, : position + 1]
        if not seen.any():
            continue
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = (want_keys[r, kv, : position + 1] @ q[i, h]) * width**-0.5
            probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
            attended[i, h] = bf(probs @ want_values[r, kv, : position + 1])
    residual = x + products(attended.view(rows * n, -1), names[1])[0]
    gate, up = products(norm(residual, norm_post), names[2])
    want = residual + products(bf(nn.functional.silu(gate) * up), names[3])[0]

    tensors = [tensor for group in groups for tensor in (group.weight, group.b)]
    got = avx512_kernel.decode_layer(
        x, norm_in, norm_post, 1e-5, tensors, mask, cos, sin, keys, values, allowed, t, heads, width**-0.5
    )
    ulp = 2**-7
    compared = [("out", got, want), ("keys", keys, want_keys), ("values", values, want_values)]
    for name, mine, theirs in compared:
        scale = theirs.abs().max().item()
        torch.testing.assert_close(mine.float(), theirs, rtol=ulp, atol=ulp * scale, msg=name)
    assert (attended.abs().amax(dim=(1, 2)) == 0).sum() == (1 if t == 0 else 0)  # the padding token's query


@pytest.mark.parametrize(
    ("length", "rows", "heads", "kv_heads", "width"),
    [(37, 3, 6, 2, 48), (70, 1, 9, 3, 64), (1, 1, 4, 4, 16)],
    ids=["3 rows, a width with a tail", "one row, SmolLM2's heads", "one token"],
)
@pytest.mark.parametrize("micro", [None, "oneDNN", "own"], ids=["at::bmm", "oneDNN", "own micro-kernel"])
def test_packed_attention_computes_what_the_rotary_embedding_and_attention_compute(
    avx512_kernel, length, rows, heads, kv_heads, width, micro
):
    """The one-node attention against transformers' rotary embedding and seal.attention's products, both
    under bf16 autocast: output and the gradients of q, k and v in bf16, each within one bf16 rounding of the
    largest value; its products through at::bmm, or through oneDNN's micro-kernel where the CPU offers it."""
    if micro:
        use_products(avx512_kernel, micro)
    avx512_kernel.set_brgemm(bool(micro))
    generator = torch.Generator().manual_seed(length)
    q, k, v = (
        (2 * torch.randn(1, length, n * width, generator=generator)).bfloat16()
        for n in (heads, kv_heads, kv_heads)
    )
    cos, sin = rotary(length, width)
    mask = attention.block_causal_mask(torch.arange(length) * rows // length)
    upstream = torch.randn(1, length, heads * width, generator=generator).bfloat16()

    class Module:
        num_key_value_groups = heads // kv_heads

    def transformers_way(q, k, v):
        shaped = [x.view(1, length, -1, width).transpose(1, 2) for x in (q, k, v)]
        rq, rk = apply_rotary_pos_emb(shaped[0], shaped[1], cos, sin)
        out, _ = attention.packed_attention_forward(Module(), rq, rk, shaped[2], mask, scaling=width**-0.5)
        return out.reshape(1, length, -1)

    def kernel_way(q, k, v):
        starts = attention.block_starts(mask)
        return avx512_kernel.packed_attention(q, k, v, cos, sin, starts, heads, width**-0.5)

    results = []
    try:
        for function in (kernel_way, transformers_way):
            inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
            with torch.profiler.profile() as prof:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = function(*inputs)
                out.backward(upstream)
            results.append([out, *(x.grad for x in inputs)])
            if function is kernel_way:
                assert any(e.name == "aten::bmm" for e in prof.events()) != bool(micro)
    finally:
        avx512_kernel.set_brgemm(True)
        avx512_kernel.set_own_products(False)
    for name, got, want in zip(["output", "q", "k", "v"], *results, strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        ulp, scale = 2**-7, want.abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp * scale, msg=name)


@pytest.mark.parametrize(
    ("kind", "node"),
    [("LlamaMLP", "swiglu"), ("LlamaAttention", "packed_attention")],
    ids=["mlp", "attention"],
)
def test_under_bf16_autocast_the_updater_trains_through_the_kernels_nodes(avx512_kernel, kind, node):
    """While the updater trains through the kernels under bf16 autocast on an AVX-512 CPU, each Llama MLP
    multiplies silu(gate) by up through `swiglu`, and each attention computes a pass through
    `packed_attention`, at least once a layer; before and afterwards, each has its own forward. (What the
    nodes compute is held to PyTorch's operations by the tests above.)"""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
    modules = [m for m in lm.model.modules() if type(m).__name__ == kind]
    calls = []
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG), 2)
    updater.kernel = Recording(avx512_kernel, node, calls)
    adapters = updater.train(JOBS[:2])
    assert all(a.result.error is None for a in adapters)
    assert modules and len(calls) >= len(modules) and set(calls) == {torch.bfloat16}
    assert all("forward" not in vars(module) for module in modules)


@pytest.mark.parametrize("lanes", [1, 2])
def test_passes_that_call_the_layers_nodes_directly_train_what_the_model_s_forward_trains(
    avx512_kernel, monkeypatch, lanes
):
    """Under bf16 autocast on an AVX-512 CPU the updater's passes call each decoder layer's nodes one after
    another (`packed_layers`) instead of the model's forward, no layer's forward is called, each layer is
    entered through the lanes' activation budget where they share one, and the adapters are bit for bit those
    trained through the model's forward."""

    def train(direct: bool):
        lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(0)
        for module in lm.model.modules():  # norms of their own (a fresh model's are all ones)
            if isinstance(module, LlamaRMSNorm):
                module.weight.data = 0.5 + torch.rand(module.weight.shape, generator=generator)
        updater = MultiLoraUpdater(lm, AdaptConfig(**MIXED_CFG, lanes=lanes), 4)
        forwards, entered = [], []
        for layer in multilora.decoder_layers(lm):
            layer.register_forward_pre_hook(lambda module, args: forwards.append(module))
        entering = lane_budget.entering
        with monkeypatch.context() as patch:
            patch.setattr(lane_budget, "entering", lambda *args: entered.append(args) or entering(*args))
            if not direct:
                patch.setattr(multilora, "direct_layers", lambda lm, kernel: False)
            adapters = updater.train(MIXED_JOBS)
        assert all(a.result.error is None for a in adapters)
        return adapters, forwards, entered, updater.budget

    adapters, forwards, entered, budget = train(direct=True)
    assert not forwards
    assert (budget is not None) == (lanes > 1) == bool(entered)
    through_forward, forwards, _, _ = train(direct=False)
    assert forwards
    for got, want in zip(adapters, through_forward, strict=True):
        assert got.result.epoch_losses == want.result.epoch_losses
        assert all(torch.equal(got.state[k], v) for k, v in want.state.items())


def test_the_updater_trains_through_the_kernel_where_it_builds(kernel):
    """`adapt.lora_kernel=auto` on a CPU: the updater holds the kernels, each adapted layer and the loss
    compute through them while `train` runs (so the equivalence tests of tests/test_multilora.py go through
    them), and not afterwards."""
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG), 2)
    assert updater.kernel is kernel
    calls, losses = [], []

    class Counting:
        def lora_linear(self, *args):
            calls.append(len(args[2]))  # the adapters in the pass
            return kernel.lora_linear(*args)

        def token_losses(self, hidden, frozen, targets, chunk):
            losses.append(len(hidden))  # the pass's tokens with a target
            return kernel.token_losses(hidden, frozen, targets, chunk)

    updater.kernel = Counting()
    adapters = updater.train(JOBS[:2])
    assert all(a.result.error is None for a in adapters)
    assert calls and max(calls) >= 1
    assert losses and min(losses) >= 1
    assert all(layer.kernel is None and layer.kernel_frozen == [] for _, layer in updater.layers)
    assert updater.head is None
    python = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, lora_kernel="python"), 2)
    assert python.kernel is None


@pytest.mark.parametrize("lean", [False, True], ids=["transformers' steps", "seal.decoding's steps"])
def test_generation_and_scoring_go_through_the_kernel_without_autograd(kernel, lean, monkeypatch):
    """The updater's generation and scoring run each adapted layer through the kernel as training does,
    without gradients. A decoding step's rows go through their slots' stacked adapters: in seal.decoding's
    steps for a Llama model (the tiny one), else in transformers' forward. With no adapter among the rows,
    the base model as it is, and nothing is laid out."""
    steps = []
    if lean:
        monkeypatch.setattr(decoding.LlamaSteps, "next", counted(decoding.LlamaSteps.next, steps))
    else:
        monkeypatch.setattr(decoding, "fits", lambda lm: False)
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG), 2)
    adapters = updater.train(JOBS[:2])
    calls, stacked = [], []

    class Counting:
        def lora_linear(self, *args):
            calls.append((torch.is_grad_enabled(), len(args[2])))
            return kernel.lora_linear(*args)

        def lora_linear_stacked(self, x, frozen, a, b, mask, scaling):
            stacked.append((torch.is_grad_enabled(), len(a) // CFG["rank"]))  # the slots stacked
            return kernel.lora_linear_stacked(x, frozen, a, b, mask, scaling)

    updater.kernel = Counting()
    updater.generate(["Port Vellan is a", "It flew in"], adapters, max_new_tokens=3)
    assert calls and set(calls) == {(False, 2)}  # the prompts' pass: both adapters, no gradient
    if lean:  # the 2 decoding steps after it
        assert len(steps) == 2 and stacked == [] and updater._decoding_groups == {}
    else:
        assert len(stacked) == 2 * len(calls) and set(stacked) == {(False, 2)}
    calls.clear()
    stacked.clear()
    updater.score(["Port Vellan is a"], [" harbour town"], [adapters[1]])
    assert calls and not any(grad for grad, _ in calls) and stacked == []
    calls.clear()
    updater.generate(["Port Vellan is a"], [None], max_new_tokens=3)
    assert calls == [] and stacked == [] and len(steps) == 2 * lean
    assert all(layer.kernel is None and layer.kernel_frozen == [] for _, layer in updater.layers)
    assert all(layer.stacks == {} for _, layer in updater.layers) and not updater.routing.stacked


@pytest.mark.parametrize("shape", [(576, 1536), (2, 16), (49152 // 64, 576), (34, 48)])
def test_a_weight_transposed_by_the_kernels_is_its_transpose(avx512_kernel, shape):
    """`transposed_copy` (the backward's layout of a frozen weight) against `.t()`, bit for bit; weights it
    does not take (an odd number of rows, columns not a multiple of 16, float32) are transposed by PyTorch."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])).bfloat16()
    assert torch.equal(avx512_kernel.transposed_copy(weight), weight.t())
    assert torch.equal(transposed(weight, avx512_kernel), weight.t())
    for other in (weight[:-1], weight[:, :-1], weight.float()):
        assert torch.equal(transposed(other, avx512_kernel), other.t())
    with pytest.raises(RuntimeError, match="transposed_copy"):
        avx512_kernel.transposed_copy(weight[:-1])


def test_each_checkout_and_version_of_the_source_builds_under_a_name_of_its_own(tmp_path):
    """Two checkouts on one machine must not rebuild each other's kernel: its name follows path and text."""
    copy = tmp_path / kernels.SOURCE.name
    copy.write_text(kernels.SOURCE.read_text())
    assert kernels.extension_name(kernels.SOURCE) == kernels.NAME
    assert kernels.extension_name(copy) != kernels.NAME
    before = kernels.extension_name(copy)
    copy.write_text(kernels.SOURCE.read_text() + "\n// changed\n")
    assert kernels.extension_name(copy) != before
    assert kernels.NAME.isidentifier()  # the module name pybind11 gives it


@pytest.mark.skipif(sys.platform != "linux" or torch.get_num_threads() < 2, reason="OpenMP, 2 threads")
def test_the_kernels_share_their_loops_between_torch_s_threads(kernel):
    """ATen's parallel_for is compiled into the extension: built without OpenMP, every loop ran on one thread
    (swiglu, rms_norm, the attention's rows) whatever torch's threads."""
    threads = torch.get_num_threads()
    assert kernel.parallel_threads() == threads
    torch.set_num_threads(1)
    try:
        assert kernel.parallel_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_kernel_that_cannot_be_built_is_an_error_only_when_required(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="seal.kernels"):
        assert kernels.cpu_kernels() is None
    assert "could not be built" in caplog.text and "Ninja is required" in caplog.text
    with pytest.raises(RuntimeError, match=r"lora_kernel=cpp: the C\+\+ kernels of cpu.cpp could not"):
        kernels.cpu_kernels(required=True)
    with pytest.raises(RuntimeError, match="could not be built"):
        MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, lora_kernel="cpp"), 2)
    assert MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG), 2).kernel is None  # auto: PyTorch's operations


def test_weights_onednn_cannot_lay_out_are_multiplied_as_they_are(kernel, monkeypatch, caplog):
    """Under bf16 autocast the updater packs the frozen weights for the kernel; where oneDNN refuses, it
    says so and trains with the weights as they are: the adapters of `model.pack_weights=false`."""

    def train(pack_weights: bool) -> list:
        lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16, pack_weights=pack_weights)
        return MultiLoraUpdater(lm, AdaptConfig(**MIXED_CFG), 2).train(MIXED_JOBS[:2])

    want = train(pack_weights=False)

    def refuse(*args):
        raise RuntimeError("no bf16 layout on this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    monkeypatch.setattr(multilora, "own_layout", lambda *args: False)  # where we would lay them out ourselves
    with caplog.at_level(logging.WARNING, logger="seal.multilora"):
        got = train(pack_weights=True)
    assert "oneDNN could not lay out" in caplog.text and "no bf16 layout" in caplog.text
    for g, w in zip(got, want, strict=True):
        assert g.result.error is None and g.result.epoch_losses == w.result.epoch_losses
        assert all(torch.equal(g.state[k], v) for k, v in w.state.items())


def test_with_only_our_own_products_the_last_lane_takes_both_threads_once_the_other_ends_and_trains_the_same(
    own_products, monkeypatch
):
    """Under bf16 autocast with every product of a pass our own (frozen weights laid out by `laid_weight`,
    rank 16, heads 16 wide), training does not depend on the number of threads: the lane left alone takes both
    threads from its first round after the other lane has ended, not at a predicted round, and its adapters
    are bit for bit those of the same lanes with one thread in all."""
    long_job = dataclasses.replace(MIXED_JOBS[3], sequences=MIXED_JOBS[3].sequences * 30)
    jobs = [*MIXED_JOBS[:3], long_job]

    def train(threads: int) -> tuple[list, list, list]:
        lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
        updater = MultiLoraUpdater(lm, AdaptConfig(**dict(MIXED_CFG, rank=16, alpha=32), lanes=2), 4)
        real_step, real_lane, rounds, ends = updater._step, updater._train_lane, [], {}

        def step(running, finish):
            if any(jobs[job.index] is long_job for job in running.values()):
                rounds.append((time.perf_counter(), torch.get_num_threads(), updater.thread_invariant))
            return real_step(running, finish)

        def lane(slots, queue, *args, **kwargs):
            long_lane = 3 in queue
            try:
                return real_lane(slots, queue, *args, **kwargs)
            finally:
                ends[long_lane] = time.perf_counter()

        lanes = updater._lanes(jobs)
        long_lane, _ = updater._tail(lanes, jobs)
        assert 3 in lanes[long_lane][1]
        # no round is predicted: where it matters, the lane would never take the other thread
        monkeypatch.setattr(updater, "_tail", lambda lanes, jobs: (long_lane, 10**6))
        monkeypatch.setattr(updater, "_step", step)
        monkeypatch.setattr(updater, "_train_lane", lane)
        torch.set_num_threads(threads)
        try:
            return updater.train(jobs), rounds, ends
        finally:
            torch.set_num_threads(1)

    adapters, rounds, ends = train(threads=2)
    assert ends[True] > ends[False] and all(invariant for _, _, invariant in rounds)
    before = [threads for start, threads, _ in rounds if start < ends[False]]
    after = [threads for start, threads, _ in rounds if start > ends[False]]
    assert before == [1] * len(before)
    assert len(after) >= 3 and after[1:] == [2] * (len(after) - 1)  # the first may have been checked before
    alone, _, _ = train(threads=1)
    for got, want in zip(adapters, alone, strict=True):
        assert got.result.epoch_losses == want.result.epoch_losses
        assert all(torch.equal(got.state[k], v) for k, v in want.state.items())


def test_a_training_pass_multiplies_by_the_laid_out_weights_in_the_order_the_kernel_is_given(own_products):
    """Where every frozen weight is laid out by the kernel, the updater gives it the order in which a pass
    multiplies by them (`set_product_order`: each product then fetches the next one's first block while its
    own last block is multiplied): each adapted layer's forward layout in turn, the output projection's two
    (the loss computes its gradient in the forward), then the layers' backward layouts in the order autograd
    runs them. The order is forgotten when training ends. (Fetching changes no number: the tests above hold
    the products.)"""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
    updater = MultiLoraUpdater(lm, AdaptConfig(**dict(MIXED_CFG, rank=16, alpha=32), lanes=1), 1)
    orders, used = [], []

    class Watching:  # the kernel, noting the orders it is given and the layouts each pass multiplies by
        def __getattr__(self, attr: str):
            function = getattr(own_products, attr)
            if attr == "set_product_order":

                def ordered(laid, inner):
                    orders.append([t.data_ptr() for t in laid])
                    return function(laid, inner)

                return ordered
            if attr == "token_losses":

                def losses(hidden, frozen, *rest):
                    used.extend(t.data_ptr() for t in frozen[2:])
                    return function(hidden, frozen, *rest)

                return losses
            if attr != "lora_linear":
                return function

            def linear(x, frozen, *rest):
                out = function(x, frozen, *rest)
                used.append(frozen[2].data_ptr())
                out.register_hook(lambda grad: used.append(frozen[3].data_ptr()))  # as its backward starts
                return out

            return linear

    updater.kernel = Watching()
    adapters = updater.train([MIXED_JOBS[0]])
    assert adapters[0].result.error is None
    assert len(orders) == 2 and orders[1] == []
    order = orders[0]
    assert len(order) == 2 * (len(updater.layers) + 1) and len(used) % len(order) == 0
    for start in range(0, len(used), len(order)):  # every pass
        assert used[start : start + len(order)] == order
    laid = own_products.laid_weight(torch.randn(32, 16).bfloat16(), False)
    with pytest.raises(RuntimeError, match="one inner size per laid-out weight"):
        own_products.set_product_order([laid, laid], [16])
    with pytest.raises(RuntimeError, match="their inner sizes"):
        own_products.set_product_order([laid, laid], [16, 7])
