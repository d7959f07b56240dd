"""Sweeps: a real Hydra multirun of the tiny model (one job failing), its ledger and W&B grouping, the
comparison report on the sweep folder, and the SLURM launcher's submission, run on submitit's local
executor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from hydra import compose, initialize_config_dir

from seal import report
from seal.sweep import summary
from tests.conftest import CACHE_DIR, CONF_DIR, TINY_OVERRIDES

# The knowledge task on the tiny model, as a command line (the sweep runs `python -m seal.train -m`).
JOB = [o for o in TINY_OVERRIDES if not o.startswith("model.device")] + [f"paths.cache_dir={CACHE_DIR}"]


def sweep(
    tmp_path: Path, *overrides: str, python: list[str] | None = None, path: str = ""
) -> subprocess.CompletedProcess:
    sweep_dir = tmp_path / "sweep"
    command = [*(python or [sys.executable, "-m", "seal.train"]), "-m", *JOB, *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["PATH"] = path + env["PATH"]
    return subprocess.run(
        [*command, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def ledger(sweep_dir: Path) -> dict[int, dict]:
    return {job["num"]: job for job in map(json.loads, (sweep_dir / "jobs.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def three_jobs(tmp_path_factory):
    """`-m task.grader=contains,bogus,exact`: the middle job fails at start, the others run to the end."""
    tmp_path = tmp_path_factory.mktemp("multirun")
    done = sweep(tmp_path, "logger=wandb", "task.grader=contains,bogus,exact")
    return tmp_path / "sweep", done


def test_a_failing_job_does_not_stop_the_sweep_and_is_reported_at_the_end(three_jobs):
    sweep_dir, done = three_jobs
    assert done.returncode == 1  # Hydra re-raises the failure, after the last job
    jobs = ledger(sweep_dir)
    assert [jobs[n]["status"] for n in (0, 1, 2)] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert jobs[1]["error"].startswith("ValueError: unknown task.grader 'bogus'")
    assert "task.grader=bogus" in jobs[1]["overrides"]
    assert (sweep_dir / "2" / "summary.json").is_file() and not (sweep_dir / "1" / "summary.json").exists()
    end = done.stdout.splitlines()
    assert f"sweep {sweep_dir}: 2 of 3 jobs finished" in end
    assert any(line.startswith("  job 1 FAILED") and "task.grader=bogus" in line for line in end)


def test_every_job_is_a_w_and_b_run_in_the_sweeps_group(three_jobs):
    sweep_dir, _ = three_jobs
    for num in (0, 2):
        config = (sweep_dir / str(num) / "config.yaml").read_text()
        assert f"group: knowledge-{sweep_dir.name}" in config
        runs = list((sweep_dir / str(num) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_the_report_on_the_sweep_lists_every_job_with_its_metrics(three_jobs, tmp_path):
    sweep_dir, _ = three_jobs
    out = tmp_path / "report"
    report.main([str(sweep_dir), "--out", str(out)])
    md = (out / "report.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| task.grader=")}
    assert set(rows) == {"task.grader=contains", "task.grader=bogus", "task.grader=exact"}
    for num, grader in ((0, "contains"), (2, "exact")):
        metrics = json.loads((sweep_dir / str(num) / "summary.json").read_text())["metrics"]
        passage = f"{metrics['knowledge/passage/accuracy']:.3f} ± {metrics['knowledge/passage/ci95']:.3f}"
        assert passage in rows[f"task.grader={grader}"] and rows[f"task.grader={grader}"].endswith("| ok |")
    assert "failed: ValueError: unknown task.grader 'bogus'" in rows["task.grader=bogus"]
    for png in ("accuracy_by_template.png", "retention.png", "cost.png"):
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # drawn, not blank


def compose_slurm(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True
        )


def test_the_slurm_launcher_composes_with_our_defaults_and_overrides():
    launcher = compose_slurm("hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30").hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.mem_gb) == (
        "gpu",
        30,
        1,
        64,
    )
    assert launcher.submitit_folder.startswith("outputs/knowledge/multiruns/")  # inside the sweep's folder


# Runs `python -m seal.train` with hydra/launcher=slurm, but the launcher's executor is replaced: a SLURM
# executor (behind a stand-in `srun`) takes the parameters and writes the sbatch script it would submit, and
# submitit's local executor runs the jobs.
ON_LOCAL = """
import runpy
import sys
from pathlib import Path
import submitit

real = submitit.AutoExecutor
SCRIPT = Path(sys.argv.pop(1))  # where the sbatch script goes; the rest is seal.train's command line

class SlurmOnLocal:
    def __init__(self, cluster, folder, **kwargs):
        assert cluster == "slurm", cluster
        self.slurm = real(cluster="slurm", folder=folder, **kwargs)
        self.local = real(cluster="local", folder=folder)

    def update_parameters(self, **params):
        self.slurm.update_parameters(**params)
        self.local.update_parameters(**{k: v for k, v in params.items() if not k.startswith("slurm_")})
        script = self.slurm._executor._make_submission_file_text("<command>", "<uid>")
        SCRIPT.write_text(script)

    def map_array(self, fn, *args):
        return self.local.map_array(fn, *args)

submitit.AutoExecutor = SlurmOnLocal
runpy.run_module("seal.train", run_name="__main__")
"""


def test_the_slurm_submission_carries_our_parameters_and_its_job_runs_on_the_local_executor(tmp_path):
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor only checks that srun exists
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    (tmp_path / "on_local.py").write_text(ON_LOCAL)
    done = sweep(
        tmp_path,
        "logger=none",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=lab",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.gpus_per_node=0",
        python=[sys.executable, str(tmp_path / "on_local.py"), str(tmp_path / "sbatch.sh")],
        path=f"{tmp_path / 'bin'}{os.pathsep}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    script = (tmp_path / "sbatch.sh").read_text().splitlines()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=30",
        "#SBATCH --gpus-per-node=0",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --job-name=train",
    ):
        assert line in script
    assert ledger(tmp_path / "sweep")[0]["status"] == "COMPLETED"
    assert (
        "knowledge/passage/accuracy"
        in json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())["metrics"]
    )


def test_the_sweep_summary_counts_each_job_once_and_names_the_killed_ones(tmp_path):
    """Job 1 failed, then succeeded when the sweep was run again into the same folder; job 2 was killed
    before it could write its line."""
    lines = [
        {"num": 0, "overrides": ["seed=0"], "status": "COMPLETED"},
        {"num": 1, "overrides": ["seed=1"], "status": "FAILED", "error": "RuntimeError: out of memory"},
        {"num": 1, "overrides": ["seed=1"], "status": "COMPLETED"},
    ]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for num in (0, 1, 2):
        (tmp_path / str(num)).mkdir()
    text = summary(tmp_path).splitlines()
    assert text[0] == f"sweep {tmp_path}: 2 of 3 jobs finished"
    assert text[1].startswith("  job 2 ENDED WITHOUT A RECORD") and not any("FAILED" in line for line in text)
