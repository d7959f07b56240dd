"""`python -m seal.bench` on the tiny model: both methods run the same jobs; the record holds the figures."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seal.bench import FLOP_FORMULA, bench, median_round
from seal.models import fast_bf16
from tests.conftest import CACHE_DIR, CONF_DIR


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
    ("executor", "chunks"), [("local", 1), ("processes", 2)], ids=["one process", "forked workers"]
)
def test_bench_compares_naive_and_ours_on_the_same_self_edits(
    tmp_path, capsys, monkeypatch, executor, chunks
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
        "executor.workers=2",
        # The memory probes run in fresh processes, whatever ours' executor: once is enough.
        f"bench.memory_probe={executor == 'local'}",
    )
    record = bench(cfg)
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    [path] = (tmp_path / "results").iterdir()  # written after each round, then whole: no partial file left
    written = json.loads(path.read_text())
    assert written["complete"] and written["ours"]["update_tokens"] == record["ours"]["update_tokens"]
    naive, ours = record["naive"], record["ours"]
    assert record["k"] == naive["self_edits"] == ours["self_edits"] == 2
    assert (record["executor"], record["workers"]) == (executor, chunks)
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
    params = int(record["flop_formula"].split(" x ")[1].split()[0].replace(",", ""))
    assert record["flop_formula"] == FLOP_FORMULA.format(params=params)
    assert ours["update_flops_per_s"] == 4 * params * ours["update_tokens_per_s"]
    assert record["speedup_self_edits_per_hour"] > 0
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
    assert "2 rounds, the figures above from each method's median one" in printed
    assert "not the same losses and answers" not in printed
    # Each job's update time: the naive reference's jobs one after another within its update phase, ours'
    # side by side within ours' (give or take the figures' rounding to 0.01 s).
    assert len(naive["job_seconds"]) == len(ours["job_seconds"]) == 2
    assert 0 < sum(naive["job_seconds"]) <= naive["seconds"]["update"] + 0.02
    assert 0 < max(ours["job_seconds"]) <= ours["seconds"]["update"] + 0.02
    assert "slowest job's update s" in printed
    memory = record["memory"]
    if executor != "local":
        assert memory is None and "each in a fresh process" not in printed
        return
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

    def fake_probe(dict_cfg, jobs):  # what a fresh process would measure: 100 MB and 10 more per adapter
        seen.append([job.key for job in jobs])
        return {"baseline_mb": 90.0, "peak_mb": 100.0 + 10 * len(jobs), "update_s": 1.0}

    monkeypatch.setattr(seal.bench, "probe", fake_probe)
    jobs = [UpdateJob(str(i), ["x"], i) for i in range(10)]
    memory = seal.bench.memory_probes(None, jobs)
    assert seen == [["0"], ["0", "1", "2", "3"], [str(i) for i in range(10)]]
    assert memory["ratios"] == {"4": 140 / 110, "10": 200 / 110}
    assert memory["ratio"] == 200 / 110
    assert memory["4"]["peak_mb"] == 140
    # K under 4: one probe of all K besides one adapter's; K = 1: one probe, ratio 1
    seen.clear()
    assert seal.bench.memory_probes(None, jobs[:3])["ratios"] == {"3": 130 / 110}
    assert seen == [["0"], ["0", "1", "2"]]
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
