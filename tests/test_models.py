import dataclasses
import platform
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from seal import models
from seal.config import ModelConfig
from seal.models import (
    RowSampler,
    choice_scorer,
    configure_attention,
    continuation_logprobs,
    decode,
    generate,
    load_model,
    resolve_dtypes,
    setup_runtime,
    weights_checksum,
)
from tests.conftest import CACHE_DIR, DEVICE


def test_tiny_model_is_a_two_layer_llama_with_the_bundled_tokenizer(tiny_lm):
    assert tiny_lm.model.config.num_hidden_layers == 2
    assert len(tiny_lm.tokenizer) == 49152
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_prompt_styles(tiny_lm):
    chat = tiny_lm.format("Hello?")
    assert "<|im_start|>user\nHello?<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    tiny_lm.prompt_style = "plain"
    try:
        assert tiny_lm.format("Hello?") == "Hello?\n"
    finally:
        tiny_lm.prompt_style = "chat"


def test_dtype_resolution_on_cpu():
    weights, _ = resolve_dtypes(ModelConfig(name="x"), torch.device("cpu"))
    assert weights == torch.float32
    weights, autocast = resolve_dtypes(ModelConfig(name="x", dtype="bfloat16"), torch.device("cpu"))
    assert weights == torch.bfloat16 and autocast is None
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtypes(ModelConfig(name="x", dtype="int3"), torch.device("cpu"))


def test_greedy_batched_equals_one_at_a_time(tiny_lm):
    prompts = [
        tiny_lm.format(t) for t in ("Short one?", "A much longer question about the passage here?", "Hm")
    ]
    batched = generate(tiny_lm, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(tiny_lm, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone


def test_sampling_depends_on_the_row_seed_only(tiny_lm):
    prompts = [tiny_lm.format("Write a line."), tiny_lm.format("Another, longer request to write a line.")]
    a = generate(tiny_lm, prompts, max_new_tokens=8, seeds=[1, 2], temperature=1.0, top_p=0.95)
    b = generate(tiny_lm, prompts[:1], max_new_tokens=8, seeds=[1], temperature=1.0, top_p=0.95)
    c = generate(tiny_lm, prompts[:1], max_new_tokens=8, seeds=[3], temperature=1.0, top_p=0.95)
    assert a[0] == b[0]
    assert a[0] != c[0]


def test_row_sampler_respects_top_p():
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    picks = {int(RowSampler([s], 1.0, 0.6)(scores)[0]) for s in range(20)}
    assert picks == {0}  # token 0 alone reaches 0.6 of the mass


# A fresh process as a run starts: setup_runtime, MKL's float32 products (the bench's peak measurement), then
# the rotary embedding's cos shared out between two threads; prints its largest error against float64.
FIRST_COS = """
import torch
from seal.config import Config
from seal.models import setup_runtime
setup_runtime(Config(num_threads=2))
a = torch.randn(2048, 2048)
for _ in range(3):
    a @ a
angles = (torch.arange(4 * 274 * 64) % 274 * 0.6978305578231812).reshape(4, -1)
print((angles.cos() - angles.double().cos()).abs().max().item())
"""


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two threads")
def test_the_first_cos_that_two_threads_share_is_exact_after_setup_runtime():
    """Without models.warm_vector_maths, one thread's half of that cos came back up to 1.5e-4 off in most
    fresh processes on the 2-core CPU (MKL's vector maths setting itself up from two threads at once), and
    one seed sampled different self-edits from one run to the next. Five processes: all exact."""
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", FIRST_COS], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert float(done.stdout.split()[-1]) < 1e-6


def test_row_sampler_draws_do_not_depend_on_batch_mates():
    """A flat row makes its batch sort the whole vocabulary while the peaked row alone takes the partial
    sort; bf16 scores tie often, so the two orders must agree on ties too."""
    peaked = (torch.randn(1, 5000, generator=torch.Generator().manual_seed(0)) * 4).bfloat16().float()
    flat = torch.zeros(1, 5000)
    alone, batched = RowSampler([7], 1.0, 0.95), RowSampler([7, 8], 1.0, 0.95)
    picks = [int(alone(peaked)[0]) for _ in range(200)]
    assert picks == [int(batched(torch.cat([peaked, flat]))[0]) for _ in range(200)]
    assert len(set(picks)) > 5  # it did sample


def test_cudnn_attention_is_turned_off_on_cuda_unless_asked_for(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    configure_attention(ModelConfig(name="m"), torch.device("cpu"))
    assert calls == []
    configure_attention(ModelConfig(name="m"), torch.device("cuda"))
    # Set either way: a later job of the same process (a sweep) gets what it asks for.
    configure_attention(ModelConfig(name="m", cudnn_attention=True), torch.device("cuda"))
    assert calls == [False, True]


def test_hub_model_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # The Hub client read HF_HUB_OFFLINE when it was imported; without this it tries the network (47 s here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not load model 'org/not-here'.*offline mode"):
        load_model(ModelConfig(name="hf", name_or_path="org/not-here"), CACHE_DIR)


def test_checksum_sees_a_changed_weight(tiny_lm):
    before = weights_checksum(tiny_lm.model)
    w = tiny_lm.model.model.layers[0].mlp.up_proj.weight
    original = w.data.clone()
    w.data[0, 0] += 1.0
    try:
        assert weights_checksum(tiny_lm.model) != before
    finally:
        w.data.copy_(original)


@pytest.mark.parametrize("stem", ["", '{"loss":'])
def test_choices_read_in_one_masked_row_score_as_each_read_alone(tiny_lm, stem):
    # Choices of different lengths, one a prefix of another: each must see only the prompt, the stem and its
    # own earlier tokens, at the positions it would have alone.
    prompt = tiny_lm.format("Choose a value.")
    choices = [' "all_tokens",', " 1}", " 10}", ' ["basic", "size", "chain"],']
    alone = continuation_logprobs(tiny_lm, [prompt + stem] * len(choices), choices)
    assert choice_scorer(tiny_lm, prompt)(stem, choices) == pytest.approx([s for s, _ in alone], abs=1e-4)


def left_padded(lm, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    lm.tokenizer.padding_side = "left"
    batch = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    return batch.input_ids, batch.attention_mask


@pytest.mark.parametrize("sampled", [False, True])
def test_a_row_that_ends_leaves_the_batch_and_the_others_decode_as_alone(tiny_lm, sampled):
    prompts = ["The Qirra probe was built by", "Port Vellan is a", "The Corvane Sodium Cell stores energy in"]

    def sampler(seeds: list[int]) -> RowSampler | None:
        return RowSampler(seeds, 1.0, 0.9) if sampled else None

    def alone(stop: torch.Tensor) -> list[list[int]]:
        return [
            decode(tiny_lm, *left_padded(tiny_lm, [p]), 8, stop, sampler([i]))[0]
            for i, p in enumerate(prompts)
        ]

    free = alone(torch.tensor([-1], device=tiny_lm.device))  # no token ends a row
    assert all(len(tokens) == 8 for tokens in free)
    stop = free[1][2]  # row 1 ends at its first such token, and any other row that draws it
    eos = torch.tensor([stop], device=tiny_lm.device)
    routes: list[list[int]] = []
    together = decode(tiny_lm, *left_padded(tiny_lm, prompts), 8, eos, sampler([0, 1, 2]), routes.append)
    assert together == alone(eos)
    assert together[1] == free[1][: free[1].index(stop) + 1]
    assert routes[0] == [0, 1, 2] and any(1 not in rows for rows in routes[1:])  # row 1 left the batch


@pytest.mark.skipif(DEVICE != "cpu", reason="LM.frozen_casts does nothing on CUDA")
def test_frozen_casts_compute_what_autocast_computes_and_leave_nothing_behind(tiny_lm):
    """Inside `frozen_casts` the frozen linear layers use weights cast once; under bf16 autocast that must
    give exactly autocast's own result, outside autocast the float32 one, and afterwards the layers are
    plain again."""
    lm = dataclasses.replace(tiny_lm, autocast_dtype=torch.bfloat16, casts={})
    ids = lm.tokenizer(["The Qirra probe flew in 2026."], return_tensors="pt").input_ids
    linears = [m for m in lm.model.modules() if type(m) is torch.nn.Linear]
    trained = linears[0]
    trained.weight.requires_grad_(True)  # a layer being trained keeps autocast's own handling
    try:
        with torch.no_grad():
            with lm.autocast():
                want = lm.model(ids).logits
            plain = lm.model(ids).logits
            with lm.frozen_casts():
                assert len(lm.casts) == len(linears) - 1 and trained not in lm.casts
                assert all(w.dtype == torch.bfloat16 for w in lm.casts.values())
                copies = dict(lm.casts)
                with lm.frozen_casts():  # an inner block uses the outer one's copies
                    assert lm.casts == copies
                with lm.autocast():
                    got = lm.model(ids).logits
                assert lm.casts == copies
                outside_autocast = lm.model(ids).logits
    finally:
        trained.weight.requires_grad_(False)
    assert want.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(outside_autocast, plain)
    assert not lm.casts and not any("forward" in m.__dict__ for m in linears)


def test_frozen_casts_are_off_without_autocast_or_when_configured_off_or_on_a_gpu(tiny_lm):
    configured_off = dataclasses.replace(tiny_lm, autocast_dtype=torch.bfloat16, cast_once=False, casts={})
    # Only the device's type is read before deciding, so the CPU model can stand for a CUDA one.
    cuda = torch.device("cuda")
    on_a_gpu = dataclasses.replace(tiny_lm, autocast_dtype=torch.bfloat16, device=cuda, casts={})
    for lm in (tiny_lm, configured_off, on_a_gpu):
        with lm.frozen_casts():
            assert not lm.casts


def _profiled_ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.mark.skipif(
    DEVICE != "cpu"
    or platform.machine() not in ("x86_64", "AMD64")
    or not torch.backends.mkldnn.is_available(),
    reason="LM.packed_weights: an x86 CPU with oneDNN",
)
def test_packed_weights_compute_the_plain_products_and_generate_the_same_text(tiny_lm):
    """Inside `packed_weights` (a CPU computing in float32) the frozen linear layers multiply by oneDNN's
    layout of their weights where autograd records nothing, and by their own weights where it does; the logits
    match the plain layers', greedy generation gives the same text, and afterwards the layers are plain."""
    lm = dataclasses.replace(tiny_lm, autocast_dtype=None, pack_weights=True, packed={})
    ids = lm.tokenizer(["The Qirra probe flew in 2026."], return_tensors="pt").input_ids
    linears = [m for m in lm.model.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        plain = lm.model(ids).logits
    with lm.packed_weights():
        assert set(lm.packed) == set(linears)
        with torch.no_grad():
            ops = _profiled_ops(lambda: lm.model(ids))
            packed = lm.model(ids).logits
        with torch.enable_grad():
            recording = _profiled_ops(lambda: lm.model(ids))
            recorded = lm.model(ids).logits
    assert "mkldnn::_linear_pointwise" in ops and "aten::mm" not in ops
    assert "mkldnn::_linear_pointwise" not in recording
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(recorded, plain)
    assert not lm.packed and not any("forward" in m.__dict__ for m in linears)
    prompts = [lm.format(t) for t in ("Short one?", "A much longer question about the passage here?", "Hm")]
    off = dataclasses.replace(lm, pack_weights=False)
    assert generate(lm, prompts, max_new_tokens=8, batch_size=3) == generate(off, prompts, max_new_tokens=8)


def test_packed_weights_are_off_under_autocast_or_when_configured_off_or_on_a_gpu(tiny_lm):
    float32 = dataclasses.replace(tiny_lm, autocast_dtype=None, packed={})
    under_autocast = dataclasses.replace(float32, autocast_dtype=torch.bfloat16)
    configured_off = dataclasses.replace(float32, pack_weights=False)
    on_a_gpu = dataclasses.replace(float32, device=torch.device("cuda"))  # only the device's type is read
    for lm in (under_autocast, configured_off, on_a_gpu):
        with lm.packed_weights():
            assert not lm.packed


def test_a_torch_that_cannot_lay_out_the_weights_generates_with_them_unchanged(tiny_lm, monkeypatch, caplog):
    lm = dataclasses.replace(tiny_lm, autocast_dtype=None, packed={})
    prompts = [lm.format("Short one?")]
    want = generate(dataclasses.replace(lm, pack_weights=False), prompts, max_new_tokens=6)

    def refuse(*args):
        raise RuntimeError("no such oneDNN operator")

    monkeypatch.setattr(models.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    with lm.packed_weights():
        assert not lm.packed and not any("forward" in m.__dict__ for m in lm.model.modules())
    assert generate(lm, prompts, max_new_tokens=6) == want
    assert "oneDNN could not lay out the weights (no such oneDNN operator)" in caplog.text


def test_a_sweep_job_s_determinism_does_not_carry_into_the_next_job_of_its_process():
    threads, before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        setup_runtime(SimpleNamespace(seed=0, deterministic=True, num_threads=threads))
        assert torch.are_deterministic_algorithms_enabled()
        setup_runtime(SimpleNamespace(seed=0, deterministic=False, num_threads=threads))
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


def test_temperature_zero_decodes_greedily_and_the_model_s_own_stop_tokens_end_a_row(tiny_lm, monkeypatch):
    prompts = [tiny_lm.format("Name a colour.") + "x", tiny_lm.format("Count to three, slowly.") + "x"]
    greedy = generate(tiny_lm, prompts, max_new_tokens=6)  # the tiny random model goes on "xxxxxx"
    assert generate(tiny_lm, prompts, max_new_tokens=6, seeds=[1, 2], temperature=0.0) == greedy
    # "x" made a stop token of the model's generation config (Llama 3 Instruct's lists several beside the
    # tokenizer's end of text): the rows now end before it.
    first = tiny_lm.tokenizer.convert_tokens_to_ids("x")
    config = tiny_lm.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", [tiny_lm.tokenizer.eos_token_id, first])
    stopped = generate(tiny_lm, prompts, max_new_tokens=6)
    assert greedy == ["xxxxxx", "xxxxxx"] and stopped == ["", ""]


def test_a_conversion_that_loses_the_race_keeps_the_winners_copy(tmp_path):
    """Two sweep jobs convert the bundled model at once: the second rename finds the first one's folder in
    place, keeps it and drops its own."""
    target, ours = tmp_path / "model", tmp_path / "model.tmp2"
    for folder, text in ((target, "first"), (ours, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
        (folder / "model.safetensors").write_text(text)
    models.install(ours, target)
    assert (target / "config.json").read_text() == "first" and not ours.exists()
    (target / "model.safetensors").unlink()  # a folder someone left half-filled is no model
    ours.mkdir()
    (ours / "config.json").write_text("third")
    with pytest.raises(OSError):
        models.install(ours, target)


def test_a_half_filled_cache_folder_is_named_not_loaded(tmp_path):
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="holds no complete model.*delete it"):
        models.cached_bundled_model(ModelConfig(name="SmolLM2-135M-Instruct"), tmp_path)
