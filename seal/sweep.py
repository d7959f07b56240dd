"""Sweeps: `python -m seal.train -m self_edit=implications,rewrite seed=0,1,2`.

Hydra runs every job of a sweep even when one fails, then re-raises the first failure. This callback
(registered in conf/config.yaml) writes each job's outcome to the sweep's `jobs.jsonl` as it ends, in the
job's own process, so that the ledger is complete under every launcher (basic, joblib, SLURM), and prints
the whole ledger when the sweep ends: which jobs failed, with their overrides and error.
`python -m seal.report SWEEP_DIR` reads the same ledger.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from seal.tracking import JSONLError, read_jsonl

log = logging.getLogger(__name__)

LEDGER = "jobs.jsonl"


def job_record(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    """One ledger line: the job's number, overrides, run directory, status and, when it failed, why."""
    record: dict[str, Any] = {
        "num": config.hydra.job.num,
        "overrides": list(job_return.overrides or []),
        "run_dir": config.hydra.runtime.output_dir,
        "status": job_return.status.name,
    }
    if job_return.status == JobStatus.FAILED:
        error = job_return._return_value  # the exception; `.return_value` would raise it
        record["error"] = f"{type(error).__name__}: {error}"
    return record


class LedgerError(ValueError):
    """A ledger line that is not JSON; the message names the file and line."""


def read_ledger(sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep's jobs.jsonl, one record per ended job (none when the file is absent)."""
    path = sweep_dir / LEDGER
    if not path.is_file():
        return []
    try:
        return read_jsonl(path)
    except JSONLError as e:
        raise LedgerError(str(e)) from e


def summary(sweep_dir: Path) -> str:
    """The sweep in a few lines: how many jobs finished, each failed job's overrides and error, and the jobs
    that left a folder but no ledger line (killed: SIGKILL, out of memory, a scheduler's time limit). A job
    run again into the same sweep directory (resume=auto) counts once, by its last line."""
    jobs = {job["num"]: job for job in read_ledger(sweep_dir)}
    folders = [int(d.name) for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    silent = sorted(num for num in folders if num not in jobs)
    failed = [job for job in jobs.values() if job["status"] != JobStatus.COMPLETED.name]
    total = len(jobs) + len(silent)
    lines = [f"sweep {sweep_dir}: {len(jobs) - len(failed)} of {total} jobs finished"]
    lines += [
        f"  job {job['num']} FAILED ({' '.join(job['overrides'])}): {job.get('error')}" for job in failed
    ]
    lines += [f"  job {num} ENDED WITHOUT A RECORD (killed?): see {sweep_dir / str(num)}" for num in silent]
    lines.append(f"compare the jobs: python -m seal.report {sweep_dir} --out {sweep_dir}/report")
    return "\n".join(lines)


class JobLedger(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # Hydra raises the first failure after the last job, and on_multirun_end is then never called;
        # the summary is printed at exit in both cases, after Hydra's own error message.
        atexit.register(lambda: print(summary(sweep_dir), flush=True))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        record = job_record(config, job_return)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with (sweep_dir / LEDGER).open("a") as f:  # one short appended line per job: safe for parallel jobs
            f.write(json.dumps(record) + "\n")
        if "error" in record:
            log.error(
                "sweep job %s failed (%s): %s", record["num"], " ".join(record["overrides"]), record["error"]
            )
