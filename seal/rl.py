"""ReST-EM, the outer loop (SEAL section 3): sample self-edits, reward each by its inner loop, keep the best,
fine-tune the generator on what was kept, merge, repeat.

This module holds the task-independent pieces:
  select        best-of-K per item, with the acceptance rule, and the round's reward diagnostics
  sft_merge     LoRA SFT of the generator on (prompt -> kept self-edit), loss on the completion only, merged
  RoundStore    `rounds/round_<k>/` on disk: atomic files, a `latest` pointer, and the inner-loop cache
                that lets a killed run resume without recomputing finished inner loops
The task (seal/tasks/knowledge.py) decides what an item, a self-edit and a reward are.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from seal import allocator
from seal.adapt import checkpointing, collate, no_rows, tokenize
from seal.config import RLConfig, SFTConfig
from seal.models import LM
from seal.tracking import write_json_atomic

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- selection


@dataclass
class Selection:
    kept: list[int | None]  # per item: the index of the kept sample, or None when none was accepted
    diagnostics: dict[str, float]


def select(
    rewards: list[list[float]],
    baselines: list[float] | None,
    cfg: RLConfig,
    eligible: list[list[bool]] | None = None,
    likelihoods: list[list[float]] | None = None,
) -> Selection:
    """Best of K per item: on equal rewards the first, or with `likelihoods` (rl.reward.tie_break=
    answer_logprob: how likely each sample's update made the gold answers) the likeliest. It is kept when its
    reward is above zero (rejection sampling keeps successes only) and, with `rl.accept_margin` set, when its
    reward (its accuracy, less any forgetting penalty) beats the item's `passage` baseline by that margin.
    `rewards[i][s]` is item i's sample s; with `rl.reward.kind=gain` the baseline was already subtracted, so
    the margin applies to the reward itself. A sample marked not `eligible` (the forgetting guard rejected
    it) is never kept."""
    kept: list[int | None] = []
    tied = 0  # items whose best reward more than one eligible sample reached
    for i, row in enumerate(rewards):
        candidates = [s for s in range(len(row)) if eligible is None or eligible[i][s]]
        if not candidates:
            kept.append(None)
            continue
        best = max(candidates, key=lambda s: (row[s], likelihoods[i][s] if likelihoods else 0.0, -s))
        tied += sum(row[s] == row[best] for s in candidates) > 1
        accept = row[best] > 0
        if cfg.accept_margin is not None:
            over = row[best] if cfg.reward.kind == "gain" else row[best] - baselines[i]
            accept = accept and over >= cfg.accept_margin
        kept.append(best if accept else None)
    flat = [r for row in rewards for r in row]
    diagnostics = {
        "reward_mean": statistics.fmean(flat),
        "reward_std": statistics.pstdev(flat),
        # How much the K samples of one item differ: with no spread there is nothing to select.
        "reward_spread_mean": statistics.fmean(max(row) - min(row) for row in rewards),
        "all_tied_share": statistics.fmean(float(max(row) == min(row)) for row in rewards),
        # How often the tie-break chose: items whose best reward was shared.
        "best_tied_share": tied / len(rewards),
        "acceptance_rate": statistics.fmean(k is not None for k in kept),
    }
    if eligible is not None:
        diagnostics["rejected_for_forgetting"] = sum(not ok for row in eligible for ok in row)
    return Selection(kept, diagnostics)


# ---------------------------------------------------------------- SFT of the generator


def _lora(cfg: SFTConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )


def completion_loss(model: torch.nn.Module, generator: LM, batch: list) -> torch.Tensor:
    """The mean loss of a batch of tokenized rows on their completion tokens (from `learn_from` on)."""
    ids, mask = collate([r.ids for r in batch], generator)
    labels = ids.masked_fill(mask == 0, -100)
    for row, r in enumerate(batch):
        labels[row, : r.learn_from] = -100
    with generator.autocast():
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def _share_loss(
    model: torch.nn.Module, generator: LM, batch: list, accelerator: Any
) -> tuple[torch.Tensor, float]:
    """This process's share of a batch's completion loss, and the whole batch's loss (the same number in
    every process). Process p takes rows p, p + n, ... of the batch (n processes) and computes the mean loss
    over its c_p completion tokens; the whole batch's loss is the mean over all its C tokens, as in one
    process, i.e. the sum over processes of loss_p * c_p / C. The gradient's all-reduce averages over the
    processes, so each backpropagates loss_p * n * c_p / C: the average is then the one-process gradient,
    however unevenly the rows (and their tokens) are shared. A process left without a row (a batch of
    fewer rows than processes) still runs the batch's last row, weighted 0, so that it takes part in the
    all-reduce and adds nothing to it."""
    n, rank = accelerator.num_processes, accelerator.process_index
    share = batch[rank::n]
    fraction = sum(r.targets for r in share) / sum(r.targets for r in batch)  # c_p / C; 0 without rows
    loss = completion_loss(model, generator, share or batch[-1:])
    whole = accelerator.reduce(loss.detach() * fraction, "sum").item()
    return loss * (n * fraction), whole


def sft_train(
    generator: LM, examples: list[tuple[str, str]], cfg: SFTConfig, seed: int, accelerator: Any = None
) -> tuple[Any, dict[str, torch.Tensor], float]:
    """Fine-tune a fresh LoRA adapter of `generator` on (formatted prompt, completion) pairs, the loss on the
    completion tokens only. Returns the PEFT-wrapped model, the adapter's weights (CPU) and the last epoch's
    mean loss. With an `accelerate.Accelerator` (seal/sft.py, under `accelerate launch`), every process takes
    its share of each batch and the gradients are averaged over the processes (DDP, or FSDP as the launch
    config says), each share's loss weighted by its tokens (`_share_loss`) so that the adapter and the loss
    are those of one process up to rounding."""
    # The prompt is read, not learnt: the loss is on the completion (and its EOS) only.
    rows = tokenize(generator, [c for _, c in examples], cfg.max_length, prefixes=[p for p, _ in examples])
    if not rows:
        raise RuntimeError(f"rl.sft: {no_rows(cfg.max_length)} (rl.sft.max_length)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft = get_peft_model(generator.model, _lora(cfg))
    params = [p for n, p in peft.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model = peft
    if accelerator is not None:
        model, optimizer = accelerator.prepare(peft, optimizer)
    order_rng = random.Random(seed)
    epoch_loss = math.nan
    model.train()
    try:
        # after PEFT wrapped the model: it would hook the embeddings a second time
        with checkpointing(peft.get_base_model(), cfg.gradient_checkpointing):
            for epoch in range(cfg.epochs):
                order = list(range(len(rows)))
                order_rng.shuffle(order)
                losses = []
                for at in range(0, len(order), cfg.batch_size):
                    batch = [rows[i] for i in order[at : at + cfg.batch_size]]
                    if accelerator is None:
                        loss = completion_loss(model, generator, batch)
                        value = loss.item()
                    else:
                        loss, value = _share_loss(model, generator, batch, accelerator)
                    if not math.isfinite(value):
                        raise RuntimeError(f"SFT of the generator: non-finite loss {value} at epoch {epoch}")
                    loss.backward() if accelerator is None else accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(value)
                epoch_loss = sum(losses) / len(losses)
    finally:
        model.eval()
    if accelerator is None:
        state = get_peft_model_state_dict(peft)
    else:  # the full adapter, gathered from the shards when the launch config shards the model
        state = get_peft_model_state_dict(peft, state_dict=accelerator.get_state_dict(model))
    return peft, {k: v.detach().to("cpu", copy=True) for k, v in state.items()}, epoch_loss


def sft_merge(
    generator: LM, examples: list[tuple[str, str]], cfg: SFTConfig, seed: int
) -> tuple[dict, float]:
    """`sft_train`, then the adapter merged into the generator's weights. Returns the adapter's weights
    (`apply_adapter` merges them again on resume) and the last epoch's mean loss."""
    peft, state, epoch_loss = sft_train(generator, examples, cfg, seed)
    generator.model = peft.merge_and_unload().eval().requires_grad_(False)
    # The SFT's activations, logits and optimizer state are freed by now; under TCMalloc their pages would
    # stay in the resident set, beneath whatever the next phase allocates (a one-round run: 5.39 GB against
    # 4.55 GB peak RSS, benchmarks/README.md).
    allocator.release_free_memory()
    return state, epoch_loss


LAUNCHERS = {"accelerate": "accelerate.commands.launch", "torchrun": "torch.distributed.run"}


def launch_sft(
    store: RoundStore, k: int, examples: list[tuple[str, str]], cfg: SFTConfig, seed: int
) -> float:
    """Round k's SFT in processes of its own (rl.sft.launcher=accelerate or torchrun, running seal/sft.py):
    they rebuild the generator from the run's directory, train, and save the adapter into round k."""
    store.write(k, "sft_data.json", [{"prompt": a, "completion": b} for a, b in examples])
    command = [sys.executable, "-m", LAUNCHERS[cfg.launcher], *cfg.launch_args]
    command += ["-m", "seal.sft", str(store.root.parent), str(k), str(seed)]
    log.info("round %d: SFT of the generator: %s", k, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return store.read(k, "sft_result.json")["loss"]


def apply_adapter(generator: LM, state: dict[str, torch.Tensor], cfg: SFTConfig) -> None:
    """Merge a saved SFT adapter into the generator: the same weights `sft_merge` left, recomputed."""
    peft = get_peft_model(generator.model, _lora(cfg))
    set_peft_model_state_dict(peft, state)
    generator.model = peft.merge_and_unload().eval().requires_grad_(False)


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a model, possibly wrapped with adapters (PEFT or seal.multilora), under the plain
    model's names; adapter parameters left out."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer.", "."): param
        for name, param in model.named_parameters()
        if "lora_" not in name
    }


@torch.no_grad()
def copy_base_weights(target: torch.nn.Module, source: torch.nn.Module | dict[str, torch.Tensor]) -> None:
    """Give `target` (possibly wrapped with adapters) the weights of `source`: a model of the same
    architecture, or `base_weights` of one. Adapter parameters are left as they are."""
    weights = base_weights(source) if isinstance(source, torch.nn.Module) else source
    for plain, param in base_weights(target).items():
        if plain not in weights:
            raise KeyError(f"no weight {plain!r} in the source to copy into the learner")
        param.copy_(weights[plain])


# ---------------------------------------------------------------- rounds on disk


class RoundStore:
    """`rounds/round_<k>/` of a run directory. Every file is written atomically (temp file + rename); a
    round is finished when its `state.json` exists, and `latest` (written last) names the last finished
    round. Inner-loop results are cached per chunk of jobs, keyed by the jobs' keys."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "rounds"
        self.reused = 0  # inner loops read back from the cache in this process

    def dir(self, k: int) -> Path:
        return self.root / f"round_{k}"

    def exists(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())

    def read(self, k: int, name: str) -> Any | None:
        path = self.dir(k) / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, k: int, name: str, payload: Any) -> None:
        write_json_atomic(self.dir(k) / name, payload)

    def finished(self, k: int) -> dict[str, Any] | None:
        return self.read(k, "state.json")

    def finish(self, k: int, state: dict[str, Any]) -> None:
        self.write(k, "state.json", state)
        tmp = self.root / ".latest.tmp"
        tmp.write_text(f"round_{k}\n")
        tmp.replace(self.root / "latest")

    def save_adapter(self, k: int, state: dict[str, torch.Tensor]) -> None:
        path = self.dir(k) / "generator_adapter.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".generator_adapter.safetensors.tmp")
        save_file({n: t.contiguous() for n, t in state.items()}, str(tmp))
        tmp.replace(path)

    def discard(self, k: int, *names: str) -> None:
        """Files or folders of round k that an earlier, unfinished attempt left and that no longer hold."""
        for name in names:
            path = self.dir(k) / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def load_adapter(self, k: int) -> dict[str, torch.Tensor] | None:
        path = self.dir(k) / "generator_adapter.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def cached_chunk(self, k: int, phase: str, index: int, keys: list[Any]) -> list[dict] | None:
        entry = self.read(k, f"{phase}/chunk_{index:04d}.json")
        if entry is None or entry["keys"] != json.loads(json.dumps(keys)):
            return None
        self.reused += len(entry["outcomes"])
        return entry["outcomes"]

    def cache_chunk(self, k: int, phase: str, index: int, keys: list[Any], outcomes: list[dict]) -> None:
        self.write(k, f"{phase}/chunk_{index:04d}.json", {"keys": keys, "outcomes": outcomes})


def train_generator(
    store: RoundStore,
    k: int,
    generator: LM,
    learner: LM,
    examples: list[tuple[str, str]],
    cfg: RLConfig,
    seed: int,
) -> float | None:
    """What round k does to the models: the generator fine-tuned on the kept (prompt, self-edit) pairs and
    merged, its adapter saved for `replay_round`; then, with rl.learner=updated, the learner given the
    generator's weights. Returns the SFT loss, or None when nothing was kept (the generator is unchanged)."""
    loss = None
    store.discard(k, "generator_adapter.safetensors")  # an unfinished attempt's, which replay would merge
    if examples and cfg.sft.launcher in LAUNCHERS:
        loss = launch_sft(store, k, examples, cfg.sft, seed)
        apply_adapter(generator, store.load_adapter(k), cfg.sft)
    elif examples:
        adapter, loss = sft_merge(generator, examples, cfg.sft, seed)
        store.save_adapter(k, adapter)
    if cfg.learner == "updated":
        copy_base_weights(learner.model, generator.model)
    return loss


def replay_round(store: RoundStore, k: int, generator: LM, learner: LM, cfg: RLConfig) -> None:
    """What finished round k did to the models, done again on resume: its SFT adapter (if any self-edit was
    kept) merged into the generator, and with rl.learner=updated the learner given the generator's weights."""
    adapter = store.load_adapter(k)
    if adapter is not None:
        apply_adapter(generator, adapter, cfg.sft)
    if cfg.learner == "updated":
        copy_base_weights(learner.model, generator.model)


def rng_state() -> dict[str, Any]:
    """Python's and torch's global RNG states, as JSON (every piece of work seeds itself; these are saved so
    that anything outside that rule also continues where it stopped)."""
    return {"python": repr(random.getstate()), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
