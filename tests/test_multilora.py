"""MultiLoraUpdater must be a drop-in, faster LoraUpdater: the same adapters, the same generations."""

import dataclasses
import random
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seal import models, multilora
from seal.adapt import LoraUpdater, Row, TrainedAdapter, UpdateJob, make_updater, tokenize
from seal.config import AdaptConfig
from seal.models import LM, continuation_logprobs, generate, weights_checksum
from seal.multilora import NO_TARGET, MultiLoraUpdater, for_device, pack, pack_rows
from tests.conftest import DEVICE, OUT_OF_MEMORY, load_tiny, load_tiny_granite

# The project's learning rate (adapt.lr). At ten times it, AdamW's division by the root of each gradient's
# running square turns float32 rounding in a near-zero gradient into a step-sized difference: on an AVX-512
# CPU one element of 256 differed by 1.1e-4 there, against 2e-6 at this rate.
CFG = dict(rank=4, alpha=8, epochs=3, lr=1e-3, batch_size=2)
SEQS = [
    "Qirra Probe\nThe Qirra probe was built by Tessaline Aerospace in Port Vellan.",
    "It flew in 2026.",
    "Corvane Sodium Cell\nThe cell stores energy in molten sodium and was designed in Lurith.",
    "Port Vellan is a harbour town.",
    "Tessaline Aerospace makes probes.",
]
# Different numbers of sequences, so the jobs run out of steps at different points of the batched loop.
JOBS = [UpdateJob("one", SEQS[:1], 1), UpdateJob("three", SEQS[1:4], 2), UpdateJob("five", SEQS, 3)]
# SEAL's shape of step: a passage (cut to exactly MIXED_CFG's max_length of 150 tokens) beside short lines.
MIXED_CFG = dict(CFG, max_length=150)
MIXED_JOBS = [
    UpdateJob("passage", [" ".join(SEQS * 3)], 4),
    UpdateJob("lines a", [SEQS[1], SEQS[3]], 5),
    UpdateJob("lines b", [SEQS[4], SEQS[1]], 6),
    UpdateJob("lines c", [SEQS[3], SEQS[4]], 7),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to split across threads: on a busy 2-core machine waiting
    for the second thread made these tests 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fp32() -> LM:
    """The tiny model in float32 without autocast wherever it runs (a GPU would default to bf16), so that
    batched and one-at-a-time training can be compared to 1e-4."""
    lm = load_tiny()
    lm.model.float()
    return dataclasses.replace(lm, autocast_dtype=None)


@pytest.fixture(scope="module")
def sequential() -> tuple[LoraUpdater, list[TrainedAdapter]]:
    """The reference: PEFT, one job at a time. Tests only read it (`applied` restores the model)."""
    updater = LoraUpdater(tiny_fp32(), AdaptConfig(**CFG))
    return updater, updater.train(JOBS)


@pytest.fixture(scope="module")
def sequential_mixed() -> list[TrainedAdapter]:
    """The PEFT reference for MIXED_JOBS."""
    return LoraUpdater(tiny_fp32(), AdaptConfig(**MIXED_CFG)).train(MIXED_JOBS)


def batched(capacity: int = 3, routing: str = "auto") -> MultiLoraUpdater:
    return MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, lora_routing=routing), capacity)


# Both ways of sending each row or token through its own adapter (seal.multilora.AdapterRouting).
both_routings = pytest.mark.parametrize("routing", ["runs", "mask"])
# Under SEAL_TEST_DEVICE=cuda: features that are CPU-only by design (refused or inert on a GPU).
lanes_need_a_cpu = pytest.mark.skipif(DEVICE != "cpu", reason="adapt.lanes > 1 is refused on CUDA")
casts_need_a_cpu = pytest.mark.skipif(DEVICE != "cpu", reason="LM.frozen_casts does nothing on CUDA")


def assert_same_adapter(got: TrainedAdapter, want: TrainedAdapter) -> None:
    assert got.key == want.key and got.result.error is None and want.result.error is None
    assert set(got.state) == set(want.state)
    for key, value in want.state.items():
        torch.testing.assert_close(
            got.state[key], value, atol=1e-4, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )
    assert got.result.epoch_losses == pytest.approx(want.result.epoch_losses, abs=1e-4)
    assert got.result.tokens == want.result.tokens


@both_routings
def test_batched_training_equals_training_each_job_alone(sequential, routing):
    _, alone = sequential
    adapters = batched(routing=routing).train(JOBS)
    assert len(adapters) == len(JOBS)
    for got, want in zip(adapters, alone, strict=True):
        assert_same_adapter(got, want)
    assert all(len(a.result.epoch_losses) == CFG["epochs"] for a in adapters)
    # B starts at zero: the adapters moved well beyond the tolerance the comparison allows.
    assert all(max(v.abs().max() for k, v in a.state.items() if "lora_B" in k) > 20 * 1e-4 for a in alone)


@both_routings
def test_gradient_checkpointing_keeps_less_for_backward_and_trains_the_same_adapters(sequential, routing):
    """Checkpointing must really run (fewer bytes saved for backward), and both updaters must train the
    adapters they train without it."""
    _, alone = sequential

    def train_counting_saved_bytes(updater):
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return updater.train(JOBS), saved[0]

    _, plain_bytes = train_counting_saved_bytes(batched(routing=routing))
    cfg = AdaptConfig(**CFG, gradient_checkpointing=True, lora_routing=routing)
    checkpointed = MultiLoraUpdater(tiny_fp32(), cfg, 3)
    adapters, checkpointed_bytes = train_counting_saved_bytes(checkpointed)
    for got, want in zip(adapters, alone, strict=True):
        assert_same_adapter(got, want)
    assert checkpointed_bytes < plain_bytes
    assert not checkpointed.lm.model.is_activation_checkpointing  # off again once training ends
    peft = LoraUpdater(tiny_fp32(), AdaptConfig(**CFG, gradient_checkpointing=True))
    for got, want in zip(peft.train(JOBS), alone, strict=True):
        assert_same_adapter(got, want)


def test_compiled_layers_train_the_same_adapters_and_generation_stays_eager(sequential):
    """adapt.compile: the decoder layers run as torch.compile made them (dynamo really captured graphs),
    the adapters equal PEFT's one at a time, and once training ends the layers' own forwards are back."""
    from torch._dynamo.utils import counters

    _, alone = sequential
    torch._dynamo.reset()
    counters.clear()
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, compile=True), 3)
    layers = updater.lm.model.model.layers
    assert [block for block, _ in updater.compiled] == list(layers)
    for got, want in zip(updater.train(JOBS), alone, strict=True):
        assert_same_adapter(got, want)
    assert counters["stats"]["unique_graphs"] > 0
    assert all("forward" not in block.__dict__ for block in layers)
    with pytest.raises(ValueError, match="do not combine"):
        MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, compile=True, gradient_checkpointing=True), 3)
    with pytest.raises(ValueError, match="batched updater"):
        make_updater(tiny_fp32(), AdaptConfig(**CFG, compile=True, batch_adapters=False))


def test_a_second_batched_updater_on_one_model_or_no_matching_layer_is_a_clear_error():
    """A model whose layers already hold a batched updater's adapters has no plain linear layer left (a
    second updater divided by its zero adapter size); a target that matches nothing says so too."""
    lm = tiny_fp32()
    with pytest.raises(ValueError, match="no linear layer matches adapt.target_modules=.'nowhere'."):
        make_updater(lm, AdaptConfig(**CFG, target_modules=["nowhere"]))
    make_updater(lm, AdaptConfig(**CFG))
    with pytest.raises(ValueError, match="already hold a batched updater's adapters"):
        make_updater(lm, AdaptConfig(**CFG))


def test_jobs_beyond_capacity_wait_for_a_free_slot(sequential):
    _, alone = sequential
    for got, want in zip(batched(capacity=2).train(JOBS), alone, strict=True):
        assert_same_adapter(got, want)


@lanes_need_a_cpu
@both_routings
def test_lanes_train_side_by_side_in_threads_and_equal_each_job_alone(sequential, routing, monkeypatch):
    """adapt.lanes=2: two threads, the calling one and another, each single-threaded with its own routing,
    are in a pass at the same time (a barrier that needs both), and every adapter still equals PEFT's one at
    a time. (These jobs leave no round for a lane alone: no lane takes both threads.)"""
    _, alone = sequential
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, lora_routing=routing, lanes=2), 3)
    lanes = updater._lanes(JOBS)
    assert len(lanes) == 2 and sorted(i for _, queue in lanes for i in queue) == [0, 1, 2]
    real_pass, both_in_a_pass, seen = updater._pass, threading.Barrier(2, timeout=30), []

    def lane_pass(batch, counts, values):
        if threading.get_ident() not in {ident for ident, _, _ in seen}:
            both_in_a_pass.wait()
        routing = updater.routing.current()
        seen.append((threading.get_ident(), torch.get_num_threads(), routing is updater.routing))
        return real_pass(batch, counts, values)

    monkeypatch.setattr(updater, "_pass", lane_pass)
    torch.set_num_threads(2)  # the lanes run single-threaded whatever this is, and it is back afterwards
    try:
        adapters = updater.train(JOBS)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert updater._tail(lanes, JOBS) is None
    assert len({ident for ident, _, _ in seen}) == 2 and threading.get_ident() in {i for i, _, _ in seen}
    assert all(threads == 1 and not shared for _, threads, shared in seen)
    for got, want in zip(adapters, alone, strict=True):
        assert_same_adapter(got, want)
    assert updater.slots_in_use == 3 and not updater.routing.runs


def test_a_lane_s_rounds_are_predicted_from_its_passes_and_steps_tokens():
    """Each round costs its rows' tokens plus PASS_TOKENS a pass and STEP_TOKENS a job; jobs start as slots
    free up, and a row longer than a pass has one of its own."""
    two_jobs = [[[10], [20]], [[5], [200, 100]]]  # each job's steps, each step's rows' tokens
    p, s = multilora.PASS_TOKENS, multilora.STEP_TOKENS
    assert multilora.lane_rounds(two_jobs, slots=2, pack_length=256) == [15 + p + 2 * s, 320 + 2 * p + 2 * s]
    one_slot = [10 + p + s, 20 + p + s, 5 + p + s, 300 + 2 * p + s]
    assert multilora.lane_rounds(two_jobs, slots=1, pack_length=256) == one_slot
    assert multilora.lane_rounds([[], [[300]]], slots=1, pack_length=256) == [300 + p + s]


@lanes_need_a_cpu
def test_the_lane_left_alone_takes_every_thread_at_its_planned_round_and_still_equals_each_job_alone(
    monkeypatch,
):
    """With one long job, its lane is predicted to outlast the other: from the planned round on, and only
    once the other lane has ended, it computes on both threads, in the calling thread; its adapters are
    still PEFT's."""
    long_job = dataclasses.replace(MIXED_JOBS[3], sequences=MIXED_JOBS[3].sequences * 3)
    jobs = [*MIXED_JOBS[:3], long_job]
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**MIXED_CFG, lanes=2), 4)
    lanes = updater._lanes(jobs)
    tail = updater._tail(lanes, jobs)
    assert tail is not None and 3 in lanes[tail[0]][1] and tail[1] > 0
    real_step, rounds, others_ended = updater._step, [], []

    def step(running, finish):
        lane_alone = [slot for slot in running if jobs[running[slot].index] is long_job]
        if lane_alone:
            rounds.append((torch.get_num_threads(), threading.get_ident()))
        else:
            others_ended.append(len(rounds))  # the long lane's rounds begun when this one begins
        return real_step(running, finish)

    monkeypatch.setattr(updater, "_step", step)
    torch.set_num_threads(2)
    try:
        adapters = updater.train(jobs)
    finally:
        torch.set_num_threads(1)
    threads = [n for n, _ in rounds]
    assert threads == [1] * tail[1] + [2] * (len(rounds) - tail[1])
    assert max(others_ended) <= tail[1]  # no round of the other lane began after the switch
    assert {ident for _, ident in rounds} == {threading.get_ident()}
    for got, want in zip(
        adapters, LoraUpdater(tiny_fp32(), AdaptConfig(**MIXED_CFG)).train(jobs), strict=True
    ):
        assert_same_adapter(got, want)


@lanes_need_a_cpu
def test_lanes_under_an_activation_budget_stay_within_it_and_equal_each_job_alone(sequential_mixed):
    """adapt.lane_budget=1: two lanes never hold more than one full pass's token-layers together (each
    decoder layer counts its tokens), and train the same adapters; the layers' hooks are gone afterwards."""
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**MIXED_CFG, lanes=2, lane_budget=1.0), 4)
    adapters = updater.train(MIXED_JOBS)
    for got, want in zip(adapters, sequential_mixed, strict=True):
        assert_same_adapter(got, want)
    budget = updater.budget
    layers = multilora.decoder_layers(updater.lm)
    assert budget.capacity == updater.cfg.pack_length * len(layers) and 0 < budget.peak <= budget.capacity
    assert not any(layer._forward_pre_hooks for layer in layers)
    unlimited = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**MIXED_CFG, lanes=2, lane_budget=0), 4)
    unlimited.train(MIXED_JOBS)
    assert unlimited.budget is None


@lanes_need_a_cpu
def test_lanes_of_a_model_with_unknown_decoder_layers_run_without_a_budget(sequential_mixed, monkeypatch):
    lm = tiny_fp32()
    monkeypatch.setattr(lm.model, "_no_split_modules", None)
    updater = MultiLoraUpdater(lm, AdaptConfig(**MIXED_CFG, lanes=2), 4)
    for got, want in zip(updater.train(MIXED_JOBS), sequential_mixed, strict=True):
        assert_same_adapter(got, want)
    assert updater.budget is None


@casts_need_a_cpu
def test_weights_cast_once_train_exactly_what_autocast_trains():
    """Under bf16 autocast, training with the frozen weights cast once per `train` (LM.frozen_casts, the
    output projection of the chunked loss included) must give bit for bit the adapters of casting them at
    every pass, in two lanes as in one. The casts are of the frozen weights only, which both routings read
    alike, so the CPU's default routing stands for both."""

    def train(cast_once: bool, lanes: int) -> list[TrainedAdapter]:
        lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16, cast_once=cast_once)
        cfg = AdaptConfig(**MIXED_CFG, lanes=lanes)
        return MultiLoraUpdater(lm, cfg, 4).train(MIXED_JOBS)

    torch.set_num_threads(2)
    try:
        for lanes in (1, 2):
            for got, want in zip(train(True, lanes), train(False, lanes), strict=True):
                assert got.result.epoch_losses == want.result.epoch_losses
                assert all(torch.equal(got.state[k], v) for k, v in want.state.items())
    finally:
        torch.set_num_threads(1)


@both_routings
def test_under_autocast_adapters_read_their_input_uncast_and_train_bit_for_bit_as_when_cast(
    routing, monkeypatch
):
    """MultiLoraLinear._adapter_input (PyTorch's operations, not the C++ kernel) leaves out PEFT's cast of a
    bf16 input to the adapters' float32 under autocast: the very same adapters must come out as when it is
    cast."""

    def train() -> list[TrainedAdapter]:
        lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16)
        cfg = AdaptConfig(**MIXED_CFG, lora_routing=routing, lora_kernel="python")
        return MultiLoraUpdater(lm, cfg, 4).train(MIXED_JOBS)

    uncast, dtypes = multilora.MultiLoraLinear._adapter_input, set()

    def recorded(self, x, dtype):
        dtypes.add(x.dtype)
        return uncast(self, x, dtype)

    monkeypatch.setattr(multilora.MultiLoraLinear, "_adapter_input", recorded)
    fast = train()
    assert torch.bfloat16 in dtypes  # o_proj's and down_proj's inputs: the cast would have mattered
    monkeypatch.setattr(multilora.MultiLoraLinear, "_adapter_input", lambda self, x, dtype: x.to(dtype))
    for got, want in zip(fast, train(), strict=True):
        assert got.result.epoch_losses == want.result.epoch_losses
        assert all(torch.equal(got.state[k], v) for k, v in want.state.items())


@casts_need_a_cpu
def test_peft_updates_with_weights_cast_once_train_exactly_what_autocast_trains():
    """The one-at-a-time updater under bf16 autocast: the same adapters, bit for bit, with the frozen weights
    cast once per job as with autocast's casts at every step. (Its adapter layers need no gradient while
    disabled between jobs; cast as frozen ones, they would receive none and never train.)"""

    def train(cast_once: bool) -> list[TrainedAdapter]:
        lm = dataclasses.replace(tiny_fp32(), autocast_dtype=torch.bfloat16, cast_once=cast_once)
        return LoraUpdater(lm, AdaptConfig(**MIXED_CFG)).train(MIXED_JOBS[:2])

    for got, want in zip(train(True), train(False), strict=True):
        assert got.result.epoch_losses == want.result.epoch_losses
        assert all(torch.equal(got.state[k], v) for k, v in want.state.items())
        assert max(v.abs().max() for k, v in got.state.items() if "lora_B" in k) > 1e-3  # B moved from zero


@lanes_need_a_cpu
def test_a_lane_that_fails_stops_the_others_and_its_error_is_raised(monkeypatch):
    updater = MultiLoraUpdater(tiny_fp32(), AdaptConfig(**CFG, lanes=2), 2)
    (other, queue), _ = sorted(updater._lanes(JOBS), key=lambda lane: 1 in lane[0])
    planned = sum(len(updater._plan(JOBS[i])) for i in queue)  # the other lane's steps, one pass each
    real_pass, failed, passes = updater._pass, threading.Event(), []
    other_in_a_pass = threading.Event()  # the failure waits for it: else the other lane may stop before one

    def failing_pass(batch, counts, values):
        if 1 in batch.present:  # the second lane's first pass
            assert other_in_a_pass.wait(timeout=30)
            failed.set()
            raise RuntimeError("lane 2 broke")
        other_in_a_pass.set()
        assert failed.wait(timeout=30)
        passes.append(batch.present)
        return real_pass(batch, counts, values)

    monkeypatch.setattr(updater, "_pass", failing_pass)
    with pytest.raises(RuntimeError, match="lane 2 broke"):
        updater.train(JOBS)
    assert torch.get_num_threads() == 1 and updater.lm.model.training is False
    assert 1 <= len(passes) < planned  # the other lane stopped at a step's end, long before its last
    assert all(present == other for present in passes)


@lanes_need_a_cpu
def test_auto_lanes_follow_the_threads_and_stay_one_where_threads_would_change_results():
    lm = tiny_fp32()
    torch.set_num_threads(2)
    try:
        auto = MultiLoraUpdater(lm, AdaptConfig(**MIXED_CFG), 4)
        # The passage costs about what the three short jobs cost together: it gets a lane of its own.
        assert [sorted(queue) for _, queue in auto._lanes(MIXED_JOBS)] == [[0], [1, 2, 3]]
        assert [slots for slots, _ in auto._lanes(MIXED_JOBS)] == [[0, 2], [1, 3]]
        assert len(auto._lanes(MIXED_JOBS[:1])) == 1  # no more lanes than jobs
        for settings in (dict(dropout=0.1), dict(lanes=1)):
            updater = MultiLoraUpdater(load_tiny(), AdaptConfig(**MIXED_CFG, **settings), 4)
            assert len(updater._lanes(MIXED_JOBS)) == 1
    finally:
        torch.set_num_threads(1)
    assert len(auto._lanes(MIXED_JOBS)) == 1  # auto: one lane per thread
    assert len(MultiLoraUpdater(load_tiny(), AdaptConfig(**MIXED_CFG, lanes=3), 2)._lanes(MIXED_JOBS)) == 2


def simulate_out_of_memory(monkeypatch, updater: MultiLoraUpdater, fail, error=None) -> list[int]:
    """The decoder's forward raises `error` (default: OutOfMemoryError) when fail(call number, adapters in
    the step) holds. Returns the adapters of each call so far."""
    decoder = updater.lm.model.base_model
    real_forward, calls = decoder.forward, []

    def forward(*args, **kwargs):
        calls.append(len({slot for slot, _ in updater.routing.runs if slot >= 0}))
        if fail(len(calls), calls[-1]):
            raise error or torch.OutOfMemoryError("simulated")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", forward)
    return calls


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu"])
def test_out_of_memory_halves_the_slots_and_restarts_their_jobs(sequential, monkeypatch, error):
    _, alone = sequential
    updater = batched(capacity=3)
    # More than one adapter in a step "does not fit".
    adapters_seen = simulate_out_of_memory(monkeypatch, updater, lambda call, adapters: adapters > 1, error)
    adapters = updater.train(JOBS)
    assert updater.slots_in_use == 1 and adapters_seen[0] == 3
    for got, want in zip(adapters, alone, strict=True):
        assert_same_adapter(got, want)


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu"])
def test_out_of_memory_with_one_slot_fails_that_job_only(sequential, monkeypatch, error):
    _, alone = sequential
    updater = batched(capacity=1)
    simulate_out_of_memory(monkeypatch, updater, lambda call, adapters: call == 1, error)
    one, three, five = updater.train(JOBS)
    assert one.result.error == "out of memory" and one.state is None
    assert_same_adapter(three, alone[1])
    assert_same_adapter(five, alone[2])


@pytest.mark.parametrize(("routing", "products"), [("runs", 1 + 2 * 3), ("mask", 1 + 2)])
def test_mask_routing_takes_two_products_per_layer_whatever_the_number_of_slots(routing, products):
    """Three slots and the base model in one batch: runs multiply each slot's rows by its own A and B, the
    mask all rows by the stacked A and B; both give each row its own adapter's output."""
    lm = tiny_fp32()
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG, lora_routing=routing), capacity=3)
    name, layer = updater.layers[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for slot in range(3):
            layer.lora_A[slot].normal_()
            layer.lora_B[slot].normal_()
    x = torch.randn(5, 4, layer.base_layer.in_features, device=lm.device)
    rows = [0, 0, 1, -1, 2]
    mm = []

    class CountProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                mm.append(func)
            return func(*args, **(kwargs or {}))

    with updater._adapted(torch.tensor(rows, device=lm.device)), CountProducts(), torch.no_grad():
        out = layer(x)
    assert len(mm) == products
    for i, slot in enumerate(rows):
        want = layer.base_layer(x[i])
        if slot >= 0:
            want = want + layer.scaling * x[i] @ layer.lora_A[slot].T @ layer.lora_B[slot].T
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5, msg=name)


def test_auto_settings_follow_the_device_and_bad_ones_are_refused():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU needed
    auto = AdaptConfig(**CFG)
    assert (auto.lora_routing, auto.pack_length) == ("auto", 0)
    assert (for_device(auto, cpu).lora_routing, for_device(auto, cpu).pack_length) == ("runs", 256)  # float32
    assert for_device(auto, cpu, torch.bfloat16).pack_length == 512
    assert (for_device(auto, cuda).lora_routing, for_device(auto, cuda).pack_length) == ("mask", 2048)
    chosen = AdaptConfig(**CFG, lora_routing="mask", pack_length=100, lora_kernel="python")
    assert for_device(chosen, cpu) == chosen
    # The C++ kernel: auto keeps it where it applies (built on first use), else PyTorch's operations.
    assert for_device(auto, cpu).lora_kernel == "auto"
    assert for_device(auto, cuda).lora_kernel == "python"
    assert for_device(AdaptConfig(lora_routing="mask"), cpu).lora_kernel == "python"
    with pytest.raises(ValueError, match="lora_kernel 'triton'"):
        for_device(AdaptConfig(lora_kernel="triton"), cpu)
    for setting in (dict(compile=True), dict(dropout=0.1), dict(lora_routing="mask")):
        with pytest.raises(ValueError, match="lora_kernel=cpp is for CPU training"):
            for_device(AdaptConfig(lora_kernel="cpp", **setting), cpu)
    with pytest.raises(ValueError, match="lora_kernel=cpp is for CPU training"):
        for_device(AdaptConfig(lora_kernel="cpp"), cuda)
    with pytest.raises(ValueError, match="lora_routing 'gather'"):
        for_device(AdaptConfig(lora_routing="gather"), cpu)
    with pytest.raises(ValueError, match="pack_length must be positive"):
        for_device(AdaptConfig(pack_length=-1), cpu)
    with pytest.raises(ValueError, match="lanes must be 0"):
        for_device(AdaptConfig(lanes=-1), cpu)
    assert for_device(AdaptConfig(lanes=2), cpu).lanes == 2
    with pytest.raises(ValueError, match="lanes > 1 is for CPUs"):
        for_device(AdaptConfig(lanes=2), cuda)
    for setting in (dict(compile=True), dict(dropout=0.1)):
        with pytest.raises(ValueError, match="lanes > 1 needs adapt.compile=false and adapt.dropout=0"):
            for_device(AdaptConfig(lanes=2, **setting), cpu)


def test_base_weights_and_base_outputs_do_not_change():
    lm = tiny_fp32()
    ids = lm.tokenizer(SEQS[0], return_tensors="pt")["input_ids"].to(lm.device)
    before_sum, before_logits = weights_checksum(lm.model), lm.model(input_ids=ids).logits
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG), capacity=3)
    updater.train(JOBS)
    assert weights_checksum(lm.model) == before_sum  # adapter parameters are named lora_*, so excluded
    assert all(not p.requires_grad for n, p in lm.model.named_parameters() if "lora_" not in n)
    assert torch.equal(lm.model(input_ids=ids).logits, before_logits)  # outside generate/train: no adapter


@both_routings
def test_each_row_generates_with_its_own_adapter(sequential, routing):
    reference, _ = sequential
    updater = batched(routing=routing)
    _, three, five = updater.train(JOBS)  # ("one" trains too little to change these greedy outputs)
    # Plain text of different lengths: generation sorts the prompts, and each row's adapter must follow it.
    prompts = ["The Qirra probe was built by", "Port Vellan is a", "The Corvane Sodium Cell stores energy in"]
    adapters = [three, None, five]
    # The reference applies the same weights through PEFT (same state-dict keys), one prompt at a time.
    expected = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        with reference.applied(adapter):
            expected += generate(reference.lm, [prompt], max_new_tokens=8)
    with reference.applied(three):
        assert generate(reference.lm, prompts[1:2], max_new_tokens=8) != expected[1]  # adapters matter
    assert updater.generate(prompts, adapters, max_new_tokens=8) == expected
    assert updater.generate(prompts, adapters, max_new_tokens=8, batch_size=2) == expected


def test_non_finite_loss_in_one_job_leaves_the_others_untouched(sequential, monkeypatch):
    _, alone = sequential
    real, calls = multilora.adapter_losses, []

    def poisoned(*args):
        losses = real(*args)
        calls.append(1)
        if len(calls) >= 4:  # from step 3 ("one" is done, "three" and "five" are in their second epoch)
            return losses + torch.tensor([0.0, 0.0, float("nan")], device=losses.device)
        return losses

    monkeypatch.setattr(multilora, "adapter_losses", poisoned)
    updater = batched()
    one, three, five = updater.train(JOBS)
    assert five.state is None and "non-finite loss nan at epoch 1, step 0" in five.result.error
    assert len(five.result.epoch_losses) == 1
    assert_same_adapter(one, alone[0])
    assert_same_adapter(three, alone[1])
    with pytest.raises(ValueError, match="failed to train"):
        updater.generate(["x"], [five], max_new_tokens=1)


@pytest.fixture(scope="module")
def sequential_mixed_rows() -> list[TrainedAdapter]:
    """The PEFT reference for MIXED_JOBS one sequence a step: each job's step is then one row, in one pass."""
    return LoraUpdater(tiny_fp32(), AdaptConfig(**dict(MIXED_CFG, batch_size=1))).train(MIXED_JOBS)


def test_a_job_steps_once_its_last_pass_is_done_and_a_later_failure_does_not_step_it_again(
    sequential_mixed_rows, monkeypatch
):
    """Passes of 20 tokens put the passage in a pass of its own, the lines in others. The passage's job must
    step (and drop its gradients) before the next pass; when a line's loss turns NaN in a later pass, the
    other lines' step is taken again without it, but the passage's step, already taken, is not."""
    cfg = AdaptConfig(**dict(MIXED_CFG, batch_size=1, pack_length=20))
    updater = MultiLoraUpdater(tiny_fp32(), cfg, capacity=4)
    real_pass, real_losses, holding = updater._pass, multilora.adapter_losses, []

    def tracked_pass(batch, counts, values):
        holding.append([k for k in range(4) if updater.slot_parameters(k)[0].grad is not None])
        return real_pass(batch, counts, values)

    poisoned = []

    def losses(losses, slots, counts):
        out = real_losses(losses, slots, counts)
        if (slots == 3).any():  # "lines c", wherever it is: in the first step, after the passage's pass
            poisoned.append(len(holding))
            return out + torch.tensor([0.0, 0.0, 0.0, float("nan")], device=out.device)
        return out

    monkeypatch.setattr(updater, "_pass", tracked_pass)
    monkeypatch.setattr(multilora, "adapter_losses", losses)
    passage, lines_a, lines_b, lines_c = updater.train(MIXED_JOBS)
    assert poisoned and poisoned[0] > 1  # the failure came in a later pass than the passage's
    assert "non-finite loss nan at epoch 0, step 0" in lines_c.result.error
    for got, want in zip([passage, lines_a, lines_b], sequential_mixed_rows, strict=False):
        assert_same_adapter(got, want)
    assert len(holding) > 3 * MIXED_CFG["epochs"]  # several passes a step
    assert holding == [[]] * len(holding)  # no pass began with another job's gradients waiting


def loads(lengths: list[int], pack_length: int) -> list[int]:
    """The tokens in each bin of pack's plan."""
    return [sum(lengths[i] for i in members) for members in pack(lengths, pack_length)]


def test_pack_places_every_row_once_within_pack_length_and_fills_bins_evenly():
    rng = random.Random(0)
    for _ in range(50):
        pack_length = rng.randint(20, 300)
        lengths = [rng.randint(1, pack_length) for _ in range(rng.randint(1, 40))]
        bins = pack(lengths, pack_length)
        assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in members) <= pack_length for members in bins)
    # Two passages and six lines, as SEAL's steps mix them: first fit alone would fill one sequence with
    # 500 tokens and leave 20 in the other, then pad that one to 500.
    assert loads([200, 20, 20, 200, 20, 20, 20, 20], 512) == [260, 260]
    assert loads([5, 5, 4, 3, 3], 10) == [10, 10]  # here spreading needs 3 bins; first fit is kept
    assert loads([150, 10, 9, 8, 10, 9, 8], 512) == [204]
    assert pack([], 10) == []
    with pytest.raises(ValueError, match="does not fit"):
        pack([5, 30], 20)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "seal_packed"])
def test_a_packed_row_gets_the_logits_it_gets_alone(attention):
    """transformers passes a 4D mask through as given (sdpa: booleans, eager: added to the scores); with
    positions restarting at 0 no row sees another."""
    lm = tiny_fp32()
    lm.model.set_attn_implementation(attention)
    rows = tokenize(lm, SEQS, max_length=512)
    batches = pack_rows(rows, [0] * len(rows), lm, pack_length=40)  # several sequences
    assert len(batches) > 1
    assert sorted(b.ids.shape[1] for b in batches) != [max(b.ids.shape[1] for b in batches)] * len(batches)
    packed = [
        lm.model(input_ids=b.ids, attention_mask=b.attention_mask, position_ids=b.positions).logits[0]
        for b in batches
    ]
    for row in rows:
        alone = lm.model(input_ids=torch.tensor([row.ids], device=lm.device)).logits[0]
        # Each row lies in one packed sequence, without its last token (which predicts nothing), starting
        # where its ids appear at position 0.
        fed = row.ids[:-1]
        p, start = next(
            (p, t)
            for p, b in enumerate(batches)
            for t in range(b.ids.shape[1] - len(fed) + 1)
            if b.ids[0, t : t + len(fed)].tolist() == fed and b.positions[0, t] == 0
        )
        torch.testing.assert_close(packed[p][start : start + len(fed)], alone[:-1], atol=1e-5, rtol=0)
        # It learns its own next tokens, every one of them.
        assert batches[p].targets[0, start : start + len(fed)].tolist() == row.ids[1:]
    assert sum(b.ids.shape[1] for b in batches) == sum(len(row.ids) - 1 for row in rows)


def test_rows_are_packed_from_their_first_learnt_token_and_without_what_predicts_nothing():
    """A row's tokens before `learn_from` are read but not learnt; a row with nothing to learn is not read."""
    lm = tiny_fp32()
    rows = [Row([5, 6, 7, 8, 9], learn_from=3), Row([10]), Row([11, 12], learn_from=2), Row([13, 14])]
    (batch,) = pack_rows(rows, [1, 0, 0, 2], lm, pack_length=64)
    assert batch.ids[0].tolist() == [5, 6, 7, 8, 13]  # in slot order; rows 1 and 2 have no target
    assert batch.targets[0].tolist() == [NO_TARGET, NO_TARGET, 8, 9, 14]
    assert batch.positions[0].tolist() == [0, 1, 2, 3, 0]
    assert batch.slots[0].tolist() == [1, 1, 1, 1, 2]
    assert batch.present == [1, 2]


@pytest.mark.parametrize(
    ("pack_length", "routing"), [(512, "runs"), (512, "mask"), (160, "runs"), (20, "mask")]
)
def test_rows_of_very_different_lengths_pack_tightly_and_train_as_alone(
    sequential_mixed, pack_length, routing
):
    cfg = AdaptConfig(**MIXED_CFG, pack_length=pack_length, lora_routing=routing)
    updater = MultiLoraUpdater(tiny_fp32(), cfg, capacity=4)
    decoder = updater.lm.model.base_model
    real_forward, packed = decoder.forward, []

    def forward(*args, **kwargs):
        packed.append(kwargs["input_ids"].shape)
        return real_forward(*args, **kwargs)

    decoder.forward = forward
    adapters = updater.train(MIXED_JOBS)
    for got, want in zip(adapters, sequential_mixed, strict=True):
        assert_same_adapter(got, want)
    # Every job has one step per epoch, so each step holds all jobs' sequences: the passage of 150 tokens
    # and six short lines, each read without its last token.
    lengths = [len(r.ids) for job in MIXED_JOBS for r in tokenize(updater.lm, job.sequences, 150)]
    assert max(lengths) == 150 and sorted(lengths)[-2] < 12
    fed = [n - 1 for n in lengths]
    passes = [shape[1] for shape in packed[: len(packed) // CFG["epochs"]]]
    if pack_length == 512:
        assert passes == [sum(fed)]
    elif pack_length == 160:
        assert sorted(passes) == [sum(fed) - 149, 149]
    else:  # the passage alone (it is longer than a pass), the lines a few at a time
        assert max(passes) == 149 and len(passes) >= 1 + sum(fed[1:]) // 20
    assert all(shape[0] == 1 and (shape[1] <= pack_length or shape[1] == 149) for shape in packed)
    # No padding: the passes of a step hold its tokens exactly once.
    assert sum(shape[1] for shape in packed) == sum(fed) * CFG["epochs"]


def test_capacity_fits_the_memory_budget():
    lm = tiny_fp32()
    cfg = AdaptConfig(**CFG, max_adapters=6)  # auto lanes: one, as this module runs one thread
    per_slot = multilora.slot_bytes(lm, cfg)
    assert per_slot > 0

    def fit(mb: float, **settings) -> int:
        return multilora.fit_capacity(lm, dataclasses.replace(cfg, memory_budget_mb=mb, **settings))

    assert fit(1e6) == 6  # plenty: max_adapters
    activations = multilora.pass_bytes(lm, multilora.for_device(cfg, lm.device, lm.compute_dtype))
    assert activations > 0
    assert fit((activations + 2.5 * per_slot) / multilora.MB) == 2  # the activations come first
    if DEVICE == "cpu":  # lanes are refused on CUDA
        free = dict(lanes=2, lane_budget=0)  # no activation budget: a pass's for each lane
        assert fit((2 * activations + 2.5 * per_slot) / multilora.MB, **free) == 2
        assert fit((activations + 2.5 * per_slot) / multilora.MB, **free) == 1
        budget = dict(lanes=2, lane_budget=1.5)  # the lanes' budget: 1.5 passes' in all
        assert fit((1.5 * activations + 2.5 * per_slot) / multilora.MB, **budget) == 2
        assert fit((1.5 * activations + 1.5 * per_slot) / multilora.MB, **budget) == 1
    assert fit(1e-6) == 1  # never fewer than one
    assert 1 <= multilora.fit_capacity(lm, cfg) <= 6  # auto: from the available memory


@pytest.mark.parametrize("load", [tiny_fp32, load_tiny_granite], ids=["plain head", "scaled logits"])
def test_a_pass_keeps_no_more_for_backward_than_the_capacity_estimate(load):
    """pass_bytes, which fit_capacity reserves per pass, must cover what a pass of pack_length tokens really
    saves for backward (the tensors autograd keeps, weights aside), the model's own logits included where
    they are more than the output projection's."""
    lm = load()
    cfg = for_device(AdaptConfig(**dict(CFG, epochs=1, max_length=64), pack_length=64), lm.device)
    updater = MultiLoraUpdater(lm, cfg, 1)
    weights = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}  # the adapter's too
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        (adapter,) = updater.train([UpdateJob("one pass", [" ".join(["word"] * 100)], 0)])
    assert adapter.result.tokens == 63  # one step of one row cut to max_length
    vocabulary_sized = 64 * lm.model.config.vocab_size * 4  # float32 log-probabilities of every position
    assert sum(saved.values()) > (vocabulary_sized if load is load_tiny_granite else 0)
    assert sum(saved.values()) <= multilora.pass_bytes(lm, cfg)


def test_generation_batches_hold_capacity_adapters_each_with_their_prompts_together():
    updater = batched(capacity=2)
    made = [TrainedAdapter(str(k), None, {}) for k in range(4)]
    adapters = [made[i % 4] for i in range(12)] + [None, None]  # interleaved, as a length sort leaves them
    batches = list(updater._generation_batches(list(range(14)), adapters, batch_size=64))
    assert sorted(i for b in batches for i in b) == list(range(14))
    assert len(batches) == 2  # 4 adapters at 2 per batch; the base rows need no slot
    for batch in batches:
        keys = [None if adapters[i] is None else adapters[i].key for i in batch]
        assert len({k for k in keys if k is not None}) <= 2
        runs = [k for j, k in enumerate(keys) if j == 0 or keys[j - 1] != k]
        assert len(runs) == len(set(runs))  # one run per adapter


def test_rows_still_decoding_keep_their_adapters_slots_and_nothing_is_loaded_again(sequential, monkeypatch):
    """When some rows of a batch end, generation routes the others again: each adapter keeps the slot it was
    loaded into, so nothing is copied again; a new batch loads only the adapters not already in a slot."""
    _, (one, three, five) = sequential
    updater = batched(capacity=2)
    loads, real = [], updater._load

    def load(slot: int, adapter: TrainedAdapter) -> None:
        loads.append((slot, adapter.key))
        real(slot, adapter)

    monkeypatch.setattr(updater, "_load", load)
    adapters = [three, three, None, five, five, one]
    route = updater._routed(adapters, len(adapters), batch_size=8)["context"]

    def routed(idx: list[int]) -> list[tuple[int, int]]:
        with route(idx):
            return updater.routing.runs

    assert routed([0, 1, 2, 3, 4]) == [(0, 2), (-1, 1), (1, 2)]
    assert loads == [(0, "three"), (1, "five")]
    assert routed([1, 3, 4]) == [(0, 1), (1, 2)]  # "three" and "five" stay where they are
    assert routed([3, 4]) == [(1, 2)]
    assert routed([4, 5]) == [(1, 1), (0, 1)]  # "one" takes the slot "three" left
    assert loads == [(0, "three"), (1, "five"), (0, "one")]
    with route([4, 5]), torch.no_grad():  # what each slot holds now is what its rows get
        for name, layer in updater.layers:
            for slot, adapter in ((1, five), (0, one)):
                key = f"{multilora.PEFT_PREFIX}{name}.lora_A.weight"
                assert torch.equal(layer.lora_A[slot].cpu(), adapter.state[key])


def test_merge_adds_scaled_lora_product_to_base_weights_and_keeps_the_adapted_logits():
    lm = tiny_fp32()
    updater = MultiLoraUpdater(lm, AdaptConfig(**CFG), capacity=2)
    _, three, _ = updater.train(JOBS)
    ids = lm.tokenizer(SEQS[0], return_tensors="pt")["input_ids"].to(lm.device)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in updater.layers}
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        updater._load(1, three)
        with updater._adapted(torch.tensor([1], device=lm.device)):
            adapted = lm.model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters
    updater.merge(three)
    scaling = CFG["alpha"] / CFG["rank"]  # 2, so a merge that forgot the scaling fails
    for name, layer in updater.layers:
        a, b = (three.state[f"{multilora.PEFT_PREFIX}{name}.lora_{x}.weight"].to(lm.device) for x in "AB")
        change = layer.base_layer.weight.detach() - before[name]
        torch.testing.assert_close(change, scaling * b @ a, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        merged = lm.model(input_ids=ids).logits  # no routing: the base layers alone
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    failed = TrainedAdapter("failed", three.result, None)
    with pytest.raises(ValueError, match="failed to train"):
        updater.merge(failed)


@both_routings
def test_each_row_scores_with_its_own_adapter(sequential, routing):
    reference, adapters = sequential
    # The first prompt twice: under different adapters its pairs must not share a row.
    prompts = ["The Qirra probe was built by", "Port Vellan is a", "The Corvane Sodium Cell stores energy in"]
    prompts.append(prompts[0])
    conts = [" Tessaline Aerospace", " harbour town", " molten sodium", " Tessaline Aerospace"]
    rows = [adapters[1], None, adapters[2], adapters[2]]
    expected = []
    for prompt, cont, adapter in zip(prompts, conts, rows, strict=True):
        with reference.applied(adapter):
            expected += continuation_logprobs(reference.lm, [prompt], [cont])
    with reference.applied(adapters[2]):
        assert continuation_logprobs(reference.lm, prompts[:1], conts[:1]) != expected[:1]  # adapters matter
    updater = batched(routing=routing)
    for got in (updater.score(prompts, conts, rows), reference.score(prompts, conts, rows, batch_size=2)):
        assert [n for _, n in got] == [n for _, n in expected]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)


def test_prefixes_are_read_but_not_learnt_in_both_paths():
    prefixes = ["Question: when?\nAnswer:", "Tell me:"]
    # With its own learning rate and epochs, beside a job with the defaults.
    prefixed = [UpdateJob("prompted", SEQS[1:3], 8, prefixes=prefixes, lr=5e-3, epochs=2), JOBS[1]]
    want, want_default = LoraUpdater(tiny_fp32(), AdaptConfig(**CFG)).train(prefixed)
    got, got_default = batched().train(prefixed)
    assert_same_adapter(got, want)
    assert_same_adapter(got_default, want_default)
    assert len(want.result.epoch_losses) == 2 and len(want_default.result.epoch_losses) == CFG["epochs"]
    lm = tiny_fp32()
    rows = tokenize(lm, SEQS[1:3], 512, prefixes=["Question: when?\nAnswer:", "Tell me:"])
    plain = tokenize(lm, SEQS[1:3], 512)
    assert [r.ids[r.learn_from :] for r in rows] == [r.ids for r in plain]  # the sequences follow whole
    # Only the sequences' tokens are learnt: EOS included, the first token too (the prefix predicts it).
    assert want.result.tokens == 2 * sum(len(r.ids) for r in plain)
    alone = LoraUpdater(tiny_fp32(), AdaptConfig(**CFG)).train(
        [UpdateJob("plain", SEQS[1:3], 8, lr=5e-3, epochs=2)]
    )[0]
    assert alone.result.epoch_losses != want.result.epoch_losses


@both_routings
def test_a_row_that_ends_early_leaves_the_batch_and_the_others_keep_their_adapters(
    sequential, monkeypatch, routing
):
    reference, _ = sequential
    updater = batched(routing=routing)
    _, three, five = updater.train(JOBS)
    prompts = ["The Qirra probe was built by", "Port Vellan is a", "The Corvane Sodium Cell stores energy in"]
    adapters = [three, None, five]
    # The base model's first token after the middle prompt ends its row at once: it becomes the EOS token.
    tok = updater.lm.tokenizer
    ids = tok(prompts[1], return_tensors="pt", add_special_tokens=False).input_ids.to(updater.lm.device)
    stop = int(updater.lm.model(input_ids=ids).logits[0, -1].argmax())
    real = models.decode
    monkeypatch.setattr(
        models,
        "decode",
        lambda lm, ids, mask, n, eos, *rest: real(lm, ids, mask, n, eos.new_tensor([stop]), *rest),
    )
    expected = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        with reference.applied(adapter):
            expected += generate(reference.lm, [prompt], max_new_tokens=8)
    assert len(tok(expected[1]).input_ids) == 1 and len(tok(expected[0]).input_ids) > 1
    assert updater.generate(prompts, adapters, max_new_tokens=8) == expected


def test_a_model_that_scales_its_logits_trains_the_adapters_peft_trains():
    """Granite divides its logits by `logits_scaling` after the output projection. The batched updater must
    train on those logits, as PEFT does through the model's own forward, not on the bare projection."""
    assert models.output_projection(load_tiny_granite().model) is None
    want = LoraUpdater(load_tiny_granite(), AdaptConfig(**CFG)).train(JOBS)
    got = MultiLoraUpdater(load_tiny_granite(), AdaptConfig(**CFG), 3).train(JOBS)
    for g, w in zip(got, want, strict=True):
        assert_same_adapter(g, w)


def test_a_job_that_diverges_fails_alone_though_its_nan_spread_through_a_shared_pass(sequential):
    """A learning rate of 1e30 sends the first job's weights to inf after its first step; in a pass shared
    with the others, attention spreads its NaN to every job present. The others must still train as alone."""
    _, alone = sequential
    diverges = UpdateJob("diverges", SEQS[:3], 7, lr=1e30)
    updater = batched(capacity=4)
    bad, one, three, five = updater.train([diverges, *JOBS])
    assert bad.state is None and "non-finite loss" in bad.result.error
    for got, want in zip((one, three, five), alone, strict=True):
        assert got.result.error is None
        assert_same_adapter(got, want)
