"""seal.decoding: the batched updater's lean decoding steps for Llama models, against transformers' own."""

import contextlib
import dataclasses

import pytest
import torch

from seal import decoding
from seal.config import AdaptConfig
from seal.models import ModelSteps, cpu_supports_bf16
from seal.multilora import MultiLoraUpdater
from tests.conftest import DEVICE
from tests.test_multilora import CFG, JOBS, tiny_fp32

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="seal.decoding is for CPUs")


def counted_context(method, entered: list):
    """`method` (a context manager method), appending "entered" to `entered` at each call."""

    def counting(self, *args, **kwargs):
        entered.append("entered")
        return method(self, *args, **kwargs)

    return counting


PROMPTS = ["The Qirra probe was built by", "Port Vellan is a", "The Corvane Sodium Cell stores energy in"]


def side_by_side(updater: MultiLoraUpdater, adapters: list, steps: int, drop_at: int):
    """Decodes PROMPTS greedily with seal.decoding's steps and with transformers' (`ModelSteps`) from the same
    routing, both fed transformers' tokens; the middle row leaves the batch after `drop_at` steps. Yields
    both steps' logits at each step."""
    lm = updater.lm
    lm.tokenizer.padding_side = "left"
    batch = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    route = updater._routed(adapters, len(PROMPTS), len(PROMPTS))["context"]
    with (
        torch.no_grad(),
        updater._inference(adapters),
        lm.autocast(),
        lm.frozen_casts(),
        contextlib.ExitStack() as routed,
    ):
        routed.enter_context(route([0, 1, 2]))
        ours, theirs = updater._steps()(), ModelSteps(lm)
        a = ours.start(batch.input_ids, batch.attention_mask, positions)
        b = theirs.start(batch.input_ids, batch.attention_mask, positions)
        for step in range(steps):
            yield a, b
            tokens = b.argmax(-1)
            if step == drop_at:
                keep = torch.tensor([0, 2], device=lm.device)
                ours.keep(keep)
                theirs.keep(keep)
                tokens = tokens[keep]
                routed.close()
                routed.enter_context(route([0, 2]))
            a, b = ours.next(tokens), theirs.next(tokens)


def test_lean_steps_compute_the_logits_of_transformers_steps_as_rows_leave_and_the_cache_grows():
    """In float32, row by row through its own adapter or the base model: 70 steps outgrow the cache's first
    64 positions, and a row that leaves takes its cache rows along."""
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG), 3)
    _, three, five = updater.train(JOBS)
    compared = 0
    for ours, theirs in side_by_side(updater, [three, None, five], steps=70, drop_at=5):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        compared += 1
    assert compared == 70


@pytest.mark.skipif(not cpu_supports_bf16(), reason="bf16 decoding needs a CPU that computes in bf16")
@pytest.mark.parametrize(
    ("fused", "rank"),
    [(True, 4), (True, 16), (False, 4)],
    ids=["decode_layer", "decode_layer, rank 16", "PyTorch's operations"],
)
def test_under_bf16_lean_steps_stay_within_bf16_rounding_of_transformers_steps(fused, rank, monkeypatch):
    """Under bf16 autocast each step's logits differ from transformers' by bf16 roundings only, far less than
    the logits' spread: with the C++ kernels' `decode_layer` for whole layers, the left-padded prompts
    included, where AVX-512 has it (tests/test_kernels.py checks the layer itself closely), its groups laid
    out by oneDNN (rank 4) or, at rank 16 on AVX-512 BF16 without AMX, by the kernel for its own products; and
    with PyTorch's operations around the kernels' norms and SwiGLU."""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
    updater = MultiLoraUpdater(lm, AdaptConfig(**dict(CFG, rank=rank, alpha=2 * rank)), 3)
    if fused and (updater.kernel is None or not updater.kernel.avx512_available()):
        pytest.skip("decode_layer needs the C++ kernels on an AVX-512 CPU")
    made, lean_steps = [], decoding.LlamaSteps

    def steps_made(*args, **kwargs):
        made.append(lean_steps(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(decoding, "LlamaSteps", steps_made)
    if not fused:
        monkeypatch.setattr(decoding, "fused", lambda lm, kernel: False)
    _, three, five = updater.train(JOBS)
    compared = 0
    for ours, theirs in side_by_side(updater, [three, None, five], steps=8, drop_at=3):
        assert (ours - theirs).abs().max() < 0.05 * theirs.std()
        compared += 1
    assert compared == 8 and [steps.fused for steps in made] == [fused]
    if rank == 16:  # every group's sizes are multiples of 16
        own = fused and updater.kernel.own_frozen_products()
        assert [group.weight.dim() for group in made[0].weights[0].all()] == [1 if own else 2] * 4


def test_models_or_adapters_the_lean_steps_do_not_cover_decode_through_transformers():
    """Adapters on some projections only: generation goes through the model's own forward."""
    lm = tiny_fp32()
    updater = MultiLoraUpdater(lm, AdaptConfig(**{**CFG, "target_modules": ["q_proj", "v_proj"]}), 2)
    assert not decoding.fits(lm) and updater._steps() is None
    _, three, _ = updater.train(JOBS)
    assert len(updater.generate(PROMPTS[:2], [three, None], max_new_tokens=3)) == 2


@pytest.mark.skipif(not cpu_supports_bf16(), reason="bf16 decoding needs a CPU that computes in bf16")
def test_generation_through_decode_layer_lays_nothing_out_for_the_model_s_layers(monkeypatch):
    """Under bf16 where `decode_layer` computes whole layers and every prompt has an adapter, generation
    casts and lays out nothing for the model's own layers, and answers as transformers' forward does."""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG), 3)
    if not decoding.fused(lm, updater._decoding_kernel()):
        pytest.skip("decode_layer needs the C++ kernels on an AVX-512 CPU")
    _, three, five = updater.train(JOBS)
    laid_out = []
    monkeypatch.setattr(type(lm), "frozen_casts", counted_context(type(lm).frozen_casts, laid_out))
    ours = updater.generate(PROMPTS, [three, five, three], max_new_tokens=6)
    assert laid_out == [] and not lm.casts
    monkeypatch.setattr(decoding, "fits", lambda lm: False)
    assert updater.generate(PROMPTS, [three, five, three], max_new_tokens=6) == ours
    assert laid_out  # transformers' forward: the weights cast for the call


@pytest.mark.skipif(not cpu_supports_bf16(), reason="bf16 decoding needs a CPU that computes in bf16")
def test_a_prompt_start_shared_by_one_slot_s_rows_is_computed_once_and_changes_no_logit(monkeypatch):
    """Through `decode_layer`, the first tokens that the prompts of one slot's rows share (SEAL's questions:
    the chat template and the topic) go through the layers once for the slot, into every row's cache, the
    padding after them: each step's logits are bit for bit those of the prompts computed whole, left padding
    and the base model's rows included."""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
    updater = MultiLoraUpdater(lm, AdaptConfig(**dict(CFG, rank=16, alpha=32)), 3)
    if not decoding.fused(lm, updater._decoding_kernel()):
        pytest.skip("decode_layer needs the C++ kernels on an AVX-512 CPU")
    _, three, five = updater.train(JOBS)
    start = "Topic: the Qirra probe and Port Vellan.\nQuestion: "
    questions = ["Who built it?", "Where is Port Vellan, and what is made there?", "When did it fly?"]
    prompts = [start + q for q in questions] * 2 + [start + questions[1]]
    adapters = [three] * 3 + [five] * 3 + [None]
    shared = []
    prefill = decoding.LlamaSteps._prefill_prefix
    monkeypatch.setattr(
        decoding.LlamaSteps, "_prefill_prefix", lambda self, *a: shared.append(a[-1]) or prefill(self, *a)
    )
    lm.tokenizer.padding_side = "left"
    batch = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    assert batch.attention_mask.sum(-1).unique().numel() > 1  # prompts of different lengths: left padding
    logits, sharing = {}, decoding.MIN_SHARED
    for least in (sharing, 10**9):
        monkeypatch.setattr(decoding, "MIN_SHARED", least)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        route = updater._routed(adapters, len(prompts), len(prompts))["context"]
        with torch.no_grad(), updater._inference(adapters), lm.autocast(), route(list(range(len(prompts)))):
            steps = updater._steps()()
            out = [steps.start(batch.input_ids, batch.attention_mask, positions)]
            for _ in range(4):
                out.append(steps.next(out[-1].argmax(-1)))
        logits[least] = out
    assert len(shared) == 1 and shared[0] >= len(lm.tokenizer(start)["input_ids"]) - 1
    for once, whole in zip(logits[sharing], logits[10**9], strict=True):
        assert torch.equal(once, whole)


def test_a_model_with_bf16_weights_and_no_autocast_decodes_through_transformers(monkeypatch):
    """Weights in bf16 without autocast: the lean steps compute in float32 and would multiply by the bf16
    output projection, so generation goes through the model's own forward and answers as it does."""
    lm = dataclasses.replace(tiny_fp32(), autocast_dtype=None)
    lm.model.to(torch.bfloat16)
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG), 3)
    _, three, five = updater.train(JOBS)
    ours = updater.generate(PROMPTS, [three, None, five], max_new_tokens=4)
    assert not decoding.fits(lm) and updater._steps() is None
    monkeypatch.setattr(decoding, "fits", lambda lm: False)
    assert updater.generate(PROMPTS, [three, None, five], max_new_tokens=4) == ours


def test_a_model_with_an_adapted_output_projection_decodes_through_transformers(monkeypatch):
    """`lm_head` among the adapted modules: the lean steps read the output projection's own weight and bias,
    which the adapted layer does not have, so neither they nor `decode_layer` (asked under bf16 autocast with
    a stand-in for the kernels: `fused` reads only the model) take the model, and generation goes through
    the model's own forward."""
    lm = tiny_fp32()
    targets = [*AdaptConfig(**CFG).target_modules, "lm_head"]
    updater = MultiLoraUpdater(lm, AdaptConfig(**dict(CFG, target_modules=targets)), 3)
    assert not decoding.fused(dataclasses.replace(lm, autocast_dtype=torch.bfloat16), object())
    assert not decoding.fits(lm) and updater._steps() is None
    _, three, five = updater.train(JOBS)
    ours = updater.generate(PROMPTS, [three, None, five], max_new_tokens=4)
    monkeypatch.setattr(decoding, "fits", lambda lm: False)
    assert updater.generate(PROMPTS, [three, None, five], max_new_tokens=4) == ours
