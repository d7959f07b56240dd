"""Records of a run: `metrics.jsonl` (every logged row), `summary.json`, `results/*.jsonl`, mirrored to W&B.

The local files are always written; W&B only mirrors them, with the same values.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from seal.config import LoggerConfig

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write via a temp file and rename, so a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


class JSONLError(ValueError):
    """A JSONL file with a line that is not a JSON object; the message names the file and the line."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line (blank lines skipped)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JSONLError(f"{path}, line {number}: invalid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise JSONLError(f"{path}, line {number}: expected a JSON object")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def throughput_metrics(tokens: int, loops: int, update_s: float, loops_s: float) -> dict[str, float]:
    """The throughput keys every run logs, of the inner loops computed in this run (not those read back):
    trained tokens per second of update (`update_s`), and inner loops (an update and the evaluation of its
    adapter: a self-edit's, the passage baseline's, an ARC task's test-time training) per hour of `loops_s`,
    the time they took, updates and evaluations together. None computed: no keys."""
    if not loops:
        return {}
    return {
        "throughput/update_tokens_per_s": tokens / max(update_s, 1e-9),
        "throughput/self_edits_per_hour": 3600 * loops / max(loops_s, 1e-9),
    }


def code_version(root: str | Path | None = None) -> dict[str, Any]:
    """Which code made a record: seal's version and, where `root` (seal's checkout by default) is the top of
    a git work tree, its commit and whether tracked files differ from it (`dirty`). Commit and dirty are None
    where there is no git, no work tree (seal installed from a wheel) or no commit yet."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        version = metadata.version("seal")
    except metadata.PackageNotFoundError:
        version = None
    info: dict[str, Any] = {"seal": version, "commit": None, "dirty": None}
    # git reads GIT_DIR, GIT_WORK_TREE, ... before -C (set in git hooks and some dotfile setups); without
    # them it finds the checkout from `root`. No optional locks: runs of a sweep that start together do not
    # contend for the index's lock.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> subprocess.CompletedProcess:
        command = ("git", "-C", str(root), *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=10, env=env)

    try:
        head = git("rev-parse", "--show-toplevel", "HEAD")
        top, _, commit = head.stdout.strip().partition("\n")
        # The work tree must be seal's own: a wheel installed in a virtual environment that lies inside
        # some other project's checkout would otherwise report that project's commit.
        if head.returncode == 0 and Path(top).resolve() == root.resolve():
            status = git("status", "--porcelain", "--untracked-files=no")
            info["commit"] = commit
            info["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
        elif head.returncode:  # e.g. "dubious ownership" of a checkout owned by another user
            log.debug("code_version: no commit for %s: %s", root, head.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as err:  # no git, or a hung file system
        log.debug("code_version: no commit for %s: %s", root, err)
    return info


class Tracker:
    def __init__(
        self, run_dir: str | Path, cfg: LoggerConfig, config: dict[str, Any], name: str, resume: bool = False
    ):
        """`resume`: the run directory holds an interrupted run; history continues after its last row and
        W&B resumes the same run (its id is kept in `wandb_run_id`)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step = 0
        if resume and self.metrics_path.exists():
            rows = self.rows()
            # Written back whole, so that a line cut short by a kill does not swallow the next row appended.
            write_jsonl(self.metrics_path, rows)
            self.step = len(rows)
        else:
            self.metrics_path.unlink(missing_ok=True)
        id_path = self.run_dir / "wandb_run_id"
        if resume and id_path.exists():
            self.run_id = id_path.read_text().strip()
        else:
            self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
            id_path.write_text(self.run_id + "\n")
        self.wandb_run = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            import wandb

            # A process started by another W&B process inherits its service (WANDB_SERVICE). A run killed
            # there leaves its id open in that still-living service, and resuming it fails with "run ID
            # ... is in use". Each run therefore starts its own service, which dies with it.
            os.environ.pop("WANDB_SERVICE", None)
            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                mode=cfg.mode,
                group=cfg.group,
                tags=list(cfg.tags),
                name=name,
                dir=str(self.run_dir),
                config=config,
                id=self.run_id,
                resume="allow",
            )
        elif cfg.name not in ("wandb", "none"):
            raise ValueError(f"unknown logger {cfg.name!r}: expected wandb or none")

    def rows(self) -> list[dict[str, Any]]:
        """The history rows written so far (a line cut short by a kill is skipped)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a truncated line", self.metrics_path)
        return rows

    def has_row(self, key: str, value: Any) -> bool:
        return any(row.get(key) == value for row in self.rows())

    def log(self, metrics: dict[str, Any]) -> None:
        """One history row: appended to metrics.jsonl and sent to W&B at the same step."""
        row = {"step": self.step, "time": round(time.time(), 3), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=self.step)
        self.step += 1

    def results(self, name: str, rows: list[dict[str, Any]]) -> Path:
        path = self.run_dir / "results" / f"{name}.jsonl"
        write_jsonl(path, rows)
        return path

    def summary(self, metrics: dict[str, Any]) -> None:
        """summary.json = {"metrics": {...}}; the W&B run summary gets each of them with the same value."""
        write_json_atomic(self.run_dir / "summary.json", {"metrics": metrics})
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def finish(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """Summary and history stored in an offline W&B run file (`wandb/offline-run-*/run-*.wandb`), read without
    the network: lets anyone check that an offline run holds the values of `summary.json` before syncing.

    The file is a sequence of 32 KiB blocks of length-prefixed records (LevelDB log layout) holding
    protobuf `Record`s; summary updates are applied in order."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    records, pending, pos = [], b"", header
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # too little room for a record header: the writer padded to the next block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pos += header
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left - header
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return {"summary": summary, "history": history}
