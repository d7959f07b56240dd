"""`python -m seal.bench` on the tiny model: both methods run the same jobs; the record holds the figures."""

import json
import statistics
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seal.bench import FLOP_FORMULA, bench, bench_record, median_round
from seal.models import fast_bf16
from seal.tracking import code_version
from tests.conftest import CACHE_DIR, CONF_DIR

# The tiny model's matmul weights (conf/model/tiny.yaml), counted by hand: per layer the attention's q and o
# (64 x 64 each), k and v (2 key/value heads of 16: 32 x 64 each) and the MLP's gate, up and down (128 x 64
# each); then the output projection, 49,152 tokens x 64, once, though its weight is the embedding's. Neither
# LoRA, the embedding lookup nor the norms count.
TINY_MATMUL_WEIGHTS = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 49_152 * 64


def tiny_bench(tmp_path, *overrides: str):
    """The bench's config on the tiny model, one passage, its results under `tmp_path`, plus `overrides`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="bench",
            overrides=[
                "model=tiny",
                f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={CACHE_DIR}",
                f"bench.results_dir={tmp_path / 'results'}",
                "bench.passages=1",
                "bench.peak_matmul_size=256",
                *overrides,
            ],
        )
    OmegaConf.set_struct(cfg, True)
    return cfg


@pytest.mark.parametrize(
    ("executor", "workers", "chunks"),
    [("local", 2, 1), ("processes", 3, 2)],
    ids=["one process", "forked workers"],
)
def test_bench_compares_naive_and_ours_on_the_same_self_edits(
    tmp_path, capsys, monkeypatch, executor, workers, chunks
):
    import seal.bench

    order = []  # which method ran when
    for name in ("run_ours", "run_naive"):
        run = getattr(seal.bench, name)
        monkeypatch.setattr(
            seal.bench, name, lambda *a, _run=run, _name=name: order.append(_name) or _run(*a)
        )
    cfg = tiny_bench(
        tmp_path,
        "bench.self_edits_per_passage=2",
        "bench.rounds=2",
        "adapt.epochs=2",
        "self_edit.max_new_tokens=24",
        "task.max_new_tokens=8",
        "model.autocast=false",  # fp32 on any device: naive and ours then answer alike
        f"executor={executor}",
        # 3 workers for 2 jobs: a chunk each, and the record counts the 2 processes used
        f"executor.workers={workers}",
        # The memory probes run in fresh processes, whatever ours' executor: once is enough.
        f"bench.memory_probe={executor == 'local'}",
    )
    record = bench(cfg)
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    [path] = (tmp_path / "results").iterdir()  # written after each round, then whole: no partial file left
    written = json.loads(path.read_text())
    assert written["complete"] and written["ours"]["update_tokens"] == record["ours"]["update_tokens"]
    assert written["code"] == code_version()  # which code was measured (code_version: tests/test_train.py)
    naive, ours = record["naive"], record["ours"]
    assert record["k"] == naive["self_edits"] == ours["self_edits"] == 2
    assert (record["executor"], record["workers"]) == (executor, chunks)
    assert record["ours_compute_dtype"] == "torch.float32" and "ours computes in torch.float32" in printed
    assert [c["jobs"] for c in ours["chunks"]] == [2 // chunks] * chunks
    # The same jobs: the same trained tokens, and (fp32, same seeds) the same losses and answers.
    assert naive["update_tokens"] == ours["update_tokens"] > 0
    assert naive["final_losses"] == [round(x, 4) for x in naive["final_losses"]]
    for a, b in zip(naive["final_losses"], ours["final_losses"], strict=True):
        assert abs(a - b) < 1e-3
    assert record["same_answers"] == record["questions"] == 10
    assert set(record["matmul_peak_flops_per_s"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in record["matmul_peak_flops_per_s"].values())
    # Where bf16 is only emulated, MFU against its peak is flagged as meaningless.
    assert record["fast_bf16"] == fast_bf16(torch.device(record["device"]))
    assert ("bf16 is emulated on this CPU" in printed) != record["fast_bf16"]
    assert record["flop_formula"] == FLOP_FORMULA.format(params=TINY_MATMUL_WEIGHTS)
    for result in (naive, ours):
        assert result["update_flops_per_s"] == 4 * TINY_MATMUL_WEIGHTS * result["update_tokens_per_s"]
        for dtype, peak in record["matmul_peak_flops_per_s"].items():
            assert result["mfu"][dtype] == result["update_flops_per_s"] / peak
    # Two rounds, taking turns at going first; each method's figures from its slower round (the lower middle
    # of two), both rounds kept, and the same seeds train and answer alike in both.
    assert order == ["run_ours", "run_naive", "run_naive", "run_ours"]
    assert record["rounds"] == len(record["speedup_by_round"]) == 2
    for result in (naive, ours):
        assert len(result["rounds"]) == 2 and result["repeatable"]
        assert result["self_edits_per_hour"] == min(r["self_edits_per_hour"] for r in result["rounds"])
        assert result["peak_mb"] == result["rounds"][0]["peak_mb"]
    assert record["speedup_by_round"] == [
        a["self_edits_per_hour"] / b["self_edits_per_hour"]
        for a, b in zip(ours["rounds"], naive["rounds"], strict=True)
    ]
    # The headline is the median of the rounds' own ratios (of two, their mean), as is every time ratio.
    assert record["speedup_self_edits_per_hour"] == statistics.median(record["speedup_by_round"]) > 0
    assert record["ratios"]["self_edits_per_hour"] == record["speedup_self_edits_per_hour"]
    assert record["ratios"]["seconds"]["update"] == statistics.median(
        a["seconds"]["update"] / b["seconds"]["update"]
        for a, b in zip(ours["rounds"], naive["rounds"], strict=True)
    )
    assert written["ratios"] == record["ratios"]
    assert "ours / naive: the median of the rounds' own ratios (2 round(s)" in printed
    assert "2 rounds, the figures above from each method's median one" in printed
    assert "not the same losses and answers" not in printed
    # Each job's update time: the naive reference's jobs one after another within its update phase, ours'
    # side by side within ours' (give or take the figures' rounding to 0.01 s).
    assert len(naive["job_seconds"]) == len(ours["job_seconds"]) == 2
    assert 0 < sum(naive["job_seconds"]) <= naive["seconds"]["update"] + 0.02
    assert 0 < max(ours["job_seconds"]) <= ours["seconds"]["update"] + 0.02
    assert "slowest job's update s" in printed
    memory = record["memory"]
    assert "peak memory, update, bench's process (MB)" in printed
    assert set(record["memory_figures"]) >= {"memory.naive.peak_mb", "naive.peak_mb, ours.peak_mb"}
    if executor != "local":
        assert memory is None and "each in a fresh process" not in printed
        assert record["ratios"]["peak_mb_update"] is None and "fresh process (MB)" not in printed
        return
    # The naive reference's update peak in a fresh process of its own (the first job, as ours' one-adapter
    # probe), and the table's memory ratio: ours' K adapters, also in a fresh process, against it.
    assert memory["naive"]["peak_mb"] > memory["naive"]["baseline_mb"] > 0
    assert memory["naive"]["epochs"] == 2
    assert record["ratios"]["peak_mb_update"] == memory["2"]["peak_mb"] / memory["naive"]["peak_mb"]
    assert "peak memory, update, fresh process (MB)" in printed
    # One update of the tiny model holds tens of MB (a chunk of logits alone), in forked workers too: their
    # update lasts about 0.2 s, less than the 0.25 s between the meter's later samples.
    assert memory["1"]["peak_mb"] > memory["1"]["baseline_mb"] + 10 > 10
    assert memory["ratio"] == memory["2"]["peak_mb"] / memory["1"]["peak_mb"]
    assert memory["ratios"] == {"2": memory["ratio"]}
    assert memory["1"]["epochs"] == memory["2"]["epochs"] == 2  # the whole update (bench.probe_epochs=0)


def test_a_bench_stopped_part_way_keeps_the_rounds_it_finished(tmp_path, monkeypatch):
    import seal.bench

    real, runs = seal.bench.run_naive, []

    def naive_stopped_in_round_two(*args):
        runs.append(args)
        if len(runs) == 2:
            raise KeyboardInterrupt  # as if stopped by Ctrl-C while round 2's naive reference trains
        return real(*args)

    monkeypatch.setattr(seal.bench, "run_naive", naive_stopped_in_round_two)
    cfg = tiny_bench(
        tmp_path,
        "bench.self_edits_per_passage=1",
        "bench.rounds=3",
        "bench.memory_probe=false",
        "adapt.epochs=1",
        "self_edit.max_new_tokens=8",
        "task.max_new_tokens=4",
    )
    with pytest.raises(KeyboardInterrupt):
        bench(cfg)
    [path] = (tmp_path / "results").iterdir()
    record = json.loads(path.read_text())
    assert not record["complete"] and record["memory"] is None
    assert record["rounds"] == len(record["speedup_by_round"]) == 1
    for name in ("naive", "ours"):
        assert len(record[name]["rounds"]) == 1 and record[name]["update_tokens"] > 0
    assert record["speedup_self_edits_per_hour"] == record["speedup_by_round"][0]


@pytest.mark.parametrize("key", ["passages", "self_edits_per_passage"])
def test_no_self_edits_is_refused_before_anything_runs(tmp_path, monkeypatch, key):
    import seal.bench

    monkeypatch.setattr(seal.bench, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = tiny_bench(tmp_path, f"bench.{key}=0")
    with pytest.raises(ValueError, match=f"bench.{key} must be 1 or more, got 0"):
        bench(cfg)


def test_a_negative_probe_epochs_is_refused_before_anything_runs(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="bench",
            overrides=["model=tiny", f"paths.output_dir={tmp_path}", "bench.probe_epochs=-1"],
        )
    with pytest.raises(ValueError, match="bench.probe_epochs must be 0"):
        bench(cfg)


def test_no_rounds_is_refused_before_anything_runs(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="bench", overrides=["model=tiny", f"paths.output_dir={tmp_path}", "bench.rounds=0"]
        )
    with pytest.raises(ValueError, match="bench.rounds must be 1 or more, got 0"):
        bench(cfg)


def test_a_method_s_figures_are_its_median_round_and_a_round_that_differs_is_flagged():
    def run(per_hour, answers=("a",)):
        seconds = {"load": 1.0, "update": 3600 / per_hour, "eval": 0.0}
        return {
            "self_edits_per_hour": per_hour,
            "seconds": seconds,
            "update_tokens_per_s": 10.0,
            "peak_mb": {"update": 100.0 + per_hour},
            "job_seconds": [3600 / per_hour],
            "final_losses": [0.5],
            "answers": [list(answers)],
        }

    record = median_round([run(30.0), run(10.0), run(20.0)])
    assert record["self_edits_per_hour"] == 20.0 and record["seconds"]["update"] == 180.0
    assert [r["self_edits_per_hour"] for r in record["rounds"]] == [30.0, 10.0, 20.0]
    assert record["peak_mb"] == {"update": 130.0}  # the first round's, whichever round is the median
    assert record["repeatable"]
    assert median_round([run(30.0), run(10.0)])["self_edits_per_hour"] == 10.0  # even: the slower middle
    one = median_round([run(5.0)])
    assert one["self_edits_per_hour"] == 5.0 and len(one["rounds"]) == 1 and one["repeatable"]
    assert not median_round([run(30.0), run(10.0, answers=("b",)), run(20.0)])["repeatable"]


def test_memory_probes_compare_one_adapter_with_four_and_with_all_k(monkeypatch):
    import seal.bench
    from seal.adapt import UpdateJob

    seen = []

    def fake_probe(dict_cfg, jobs, measure=seal.bench.memory_probe):
        # what a fresh process would measure: ours 100 MB and 10 more per adapter; naive 150 MB
        seen.append((measure.__name__, [job.key for job in jobs]))
        peak = 150.0 if measure is seal.bench.naive_memory_probe else 100.0 + 10 * len(jobs)
        return {"baseline_mb": 90.0, "peak_mb": peak, "update_s": 1.0}

    monkeypatch.setattr(seal.bench, "probe", fake_probe)
    jobs = [UpdateJob(str(i), ["x"], i) for i in range(10)]
    memory = seal.bench.memory_probes(None, jobs)
    ours = "memory_probe"
    assert seen == [
        (ours, ["0"]),
        (ours, ["0", "1", "2", "3"]),
        (ours, [str(i) for i in range(10)]),
        ("naive_memory_probe", ["0"]),  # the naive reference holds one job at a time: the first, as ours' 1
    ]
    assert memory["ratios"] == {"4": 140 / 110, "10": 200 / 110}
    assert memory["ratio"] == 200 / 110
    assert memory["4"]["peak_mb"] == 140 and memory["naive"]["peak_mb"] == 150
    # K under 4: one probe of all K besides one adapter's; K = 1: one probe, ratio 1
    seen.clear()
    assert seal.bench.memory_probes(None, jobs[:3])["ratios"] == {"3": 130 / 110}
    assert seen == [(ours, ["0"]), (ours, ["0", "1", "2"]), ("naive_memory_probe", ["0"])]
    assert seal.bench.memory_probes(None, jobs[:1])["ratio"] == 1.0


def test_forked_workers_get_chunks_balanced_by_text_and_steps():
    from seal.adapt import STEP_COST_CHARS, UpdateJob
    from seal.bench import chunks_for
    from seal.config import Config, ExecutorConfig

    cfg = Config(executor=ExecutorConfig(name="processes", workers=2))
    # Job 2 has the least text but the most sequences, each a step with a fixed cost.
    jobs = [
        UpdateJob("long", ["x" * 900], 0),
        UpdateJob("mid", ["x" * 700], 0),
        UpdateJob("steps", ["x"] * 8, 0),
    ]
    assert 8 * (1 + STEP_COST_CHARS) > 900
    assert chunks_for(cfg, jobs) == [[2], [0, 1]]
    assert chunks_for(Config(), jobs) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="executor=local or processes, not 'ray'"):
        chunks_for(Config(executor=ExecutorConfig(name="ray")), jobs)


def test_ratios_are_medians_of_the_rounds_own_and_memory_s_from_fresh_processes():
    def run(per_hour, update_s, peak_mb=1000.0):
        return {
            "self_edits_per_hour": per_hour,
            "seconds": {"load": 2.0, "update": update_s, "eval": 10.0},
            "update_tokens_per_s": 1000 / update_s,
            "peak_mb": {"load": peak_mb, "update": peak_mb, "eval": peak_mb},
            "job_seconds": [update_s / 2, update_s],
            "final_losses": [0.5, 0.5],
            "answers": [["a"], ["b"]],
            "correct": [1, 0],
            "accuracy": 0.5,
        }

    # Ours against naive by round: 2.0x, 1.5x, 1.2x, the median 1.5x. The two median rounds (naive's first at
    # 60, ours' third at 84) are not the same round, and their ratio, 1.4x, is not the headline.
    runs = {
        "naive": [run(60.0, 100.0, 3000.0), run(50.0, 120.0), run(70.0, 90.0)],
        "ours": [run(120.0, 40.0), run(75.0, 80.0), run(84.0, 75.0)],
    }
    memory = {"2": {"peak_mb": 2200.0}, "naive": {"peak_mb": 1400.0}}
    peaks = {"float32": 1e11, "bfloat16": 1e12}
    record = bench_record({"k": 2}, runs, 1000, peaks, memory, complete=True)
    assert record["speedup_by_round"] == [2.0, 1.5, 1.2]
    assert record["speedup_self_edits_per_hour"] == 1.5
    assert record["speedup_of_median_rounds"] == 84.0 / 60.0
    ratios = record["ratios"]
    assert ratios["self_edits_per_hour"] == 1.5
    assert ratios["update_tokens_per_s"] == ratios["update_flops_per_s"] == statistics.median([2.5, 1.5, 1.2])
    assert ratios["seconds"] == {
        "load": 1.0,
        "update": statistics.median([0.4, 80 / 120, 75 / 90]),
        "eval": 1.0,
    }
    assert ratios["slowest_job_update_s"] == ratios["seconds"]["update"]
    # memory: ours' K adapters against the naive reference's one, both in fresh processes; never the peaks
    # in the bench's process (the naive reference's 3,000 MB in its first round)
    assert ratios["peak_mb_update"] == 2200.0 / 1400.0
    assert record["naive"]["peak_mb"]["update"] == 3000.0
    # MFU: achieved FLOP/s (4 per weight per trained token) over each measured peak
    for result in (record["naive"], record["ours"]):
        assert result["update_flops_per_s"] == 4 * 1000 * result["update_tokens_per_s"]
        assert result["mfu"] == {d: result["update_flops_per_s"] / p for d, p in peaks.items()}
    # Without the probes (rounds still to come, or bench.memory_probe=false), no memory ratio.
    assert bench_record({"k": 2}, runs, 1000, peaks, None, complete=False)["ratios"]["peak_mb_update"] is None


def test_the_naive_reference_is_metered_on_the_model_s_device_from_its_first_phase(tmp_path, monkeypatch):
    """On CUDA the first load's peak is allocated memory, as every later phase's is: the meter is built on
    the device the model is loaded on (resolved from model.device), not set to it after the first load."""
    import contextlib

    import seal.bench
    from seal.adapt import UpdateJob
    from seal.memory import PhaseMeter
    from seal.tasks.knowledge import load_passages

    seen = []

    class Recorded(PhaseMeter):  # each phase's device, then measured on the CPU the test runs on
        @contextlib.contextmanager
        def phase(self, name):
            seen.append((name, self.device))
            device, self.device = self.device, torch.device("cpu")
            try:
                with super().phase(name):
                    yield
            finally:
                self.device = device

    resolved = torch.device("cuda", 0)  # stands in for a CUDA device, never used by the model itself
    monkeypatch.setattr(seal.bench, "PhaseMeter", Recorded)
    monkeypatch.setattr(seal.bench, "resolve_device", lambda name: resolved)
    cfg = OmegaConf.to_object(tiny_bench(tmp_path, "adapt.epochs=1", "task.max_new_tokens=4"))
    [passage] = load_passages(replace(cfg.data, n_eval=1, n_train=0)).eval
    job = UpdateJob("a", [f"{passage.title}\n{passage.context}"], 0)
    seal.bench.run_naive(cfg, [passage, passage], [job, job])
    assert seen == [(phase, resolved) for _ in range(2) for phase in ("load", "update", "eval")]
