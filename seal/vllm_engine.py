"""generation.backend=vllm: self-edit sampling and the inner loops' answers on a vLLM engine (extra `[vllm]`,
CUDA only). The default backend, `hf`, generates with transformers in this process.

What changes with vLLM:
  - the generator's self-edits are sampled by the engine, one seed per request (`SamplingParams.seed`), so a
    run still repeats exactly, but with other samples than the hf backend draws for the same seed;
  - the inner loops' adapters are written as PEFT folders and served as runtime LoRA adapters, so the
    questions of a whole chunk are answered in one engine call;
  - after a ReST-EM round the fine-tuned generator is saved and the engine restarted on it.

vLLM keeps each runtime adapter under an integer id, and loading and unloading adapters under ever new ids
leaks adapter slots in some versions (vllm-project/vllm issues 54839 and 42633). `AdapterSlots` therefore
uses a fixed pool of ids 1..n, n = `generation.adapter_slots` (the engine's `max_loras`): a new adapter takes
a free id, or the least recently used id that no running request holds, once the adapter before it has been
removed from the engine.

Prompts reach the engine as token ids, encoded without special tokens as `seal.models.generate` encodes
them: the chat template writes the BOS token itself, and vLLM, given text, would add a second one.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from seal.adapt import TrainedAdapter
from seal.config import AdaptConfig, Config, GenerationConfig
from seal.models import resolve_device, resolve_dtypes, weights_folder

log = logging.getLogger(__name__)


def unavailable() -> str | None:
    """Why vLLM cannot run here, or None when it can."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install -e '.[vllm]', on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


class AdapterSlots:
    """A fixed pool of runtime-adapter ids 1..size on an engine that has `add_lora(request) -> bool`,
    `remove_lora(id) -> bool` and `list_loras() -> set[int]` (vLLM's LLMEngine). `acquire` loads an adapter
    folder (or finds it loaded) and holds its slot until `release`."""

    def __init__(self, engine: Any, size: int, request: Callable[[str, int, str], Any]):
        if size < 1:
            raise ValueError(f"generation.adapter_slots must be >= 1, got {size}")
        self.engine, self.size, self.request = engine, size, request
        self.loaded: collections.OrderedDict[int, str] = collections.OrderedDict()  # id -> path, LRU first
        self.held: collections.Counter[int] = collections.Counter()
        self.loads = 0

    def acquire(self, path: str) -> Any:
        slot = next((s for s, p in self.loaded.items() if p == path), None)
        if slot is None:
            free = [s for s in range(1, self.size + 1) if s not in self.loaded]
            if free:
                slot = free[0]
            else:
                idle = [s for s in self.loaded if self.held[s] == 0]
                if not idle:
                    raise RuntimeError(f"all {self.size} adapter slots are held by running requests")
                slot = idle[0]
                if not self.engine.remove_lora(slot):
                    raise RuntimeError(f"vLLM did not remove the adapter in slot {slot}")
                del self.loaded[slot]
            if not self.engine.add_lora(self.request(f"slot{slot}", slot, path)):
                raise RuntimeError(f"vLLM did not load the adapter {path} into slot {slot}")
            self.loaded[slot] = path
            self.loads += 1
        self.loaded.move_to_end(slot)
        self.held[slot] += 1
        return self.request(f"slot{slot}", slot, path)

    def release(self, request: Any) -> None:
        slot = request.lora_int_id
        if self.held[slot] <= 0:
            raise RuntimeError(f"adapter slot {slot} released more often than acquired")
        self.held[slot] -= 1


def waves(adapters: list[str | None], size: int) -> list[list[int]]:
    """Rows grouped into engine calls that need at most `size` distinct adapters each (None: the base model,
    free), adapters in order of first appearance, the rows of one adapter in one call."""
    order = list(dict.fromkeys(a for a in adapters if a is not None))
    groups = [set(order[at : at + size]) for at in range(0, len(order), size)] or [set()]
    out = [
        [i for i, a in enumerate(adapters) if a in group or (a is None and g == 0)]
        for g, group in enumerate(groups)
    ]
    return [rows for rows in out if rows]


# The values of `max_lora_rank` that vLLM accepts: recent versions accept these and 1, older ones refuse 1
# (and the oldest accept only 8 to 64, so larger adapters fail there at start).
MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    """The engine's `max_lora_rank` for adapters of rank `rank`: the smallest value vLLM accepts that is at
    least `rank` (an adapter of a lower rank than the engine's maximum is served as it is)."""
    if rank > MAX_LORA_RANKS[-1]:
        raise ValueError(
            f"adapt.rank={rank}: vLLM serves LoRA adapters of rank at most {MAX_LORA_RANKS[-1]} "
            "(use generation.backend=hf)"
        )
    return next(r for r in MAX_LORA_RANKS if r >= rank)


def export_adapter(adapter: TrainedAdapter, cfg: AdaptConfig, folder: Path) -> str:
    """An inner-loop adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors), the format
    vLLM (and `PeftModel.from_pretrained`) loads."""
    if adapter.state is None:
        raise ValueError(f"adapter {adapter.key!r} has no weights (its update failed)")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(
        {k: v.contiguous() for k, v in adapter.state.items()}, str(folder / "adapter_model.safetensors")
    )
    return str(folder)


class VLLMEngine:
    """One vLLM engine on a model folder, with runtime LoRA adapters in a fixed pool of slots. `max_lora_rank`
    is the adapters' rank (rounded up to a value vLLM accepts); `dtype` the weights' dtype ("bfloat16", or
    "auto": the folder's); `revision` a Hub revision of `model_dir`, for its weights and its tokenizer."""

    def __init__(
        self,
        model_dir: str,
        cfg: GenerationConfig,
        max_lora_rank: int,
        seed: int,
        *,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.model_dir, self.cfg, self.seed = model_dir, cfg, seed
        self.max_lora_rank = engine_lora_rank(max_lora_rank)
        self.dtype, self.revision, self.trust_remote_code = dtype, revision, trust_remote_code
        self.llm = LLM(
            model=model_dir,
            revision=revision,
            tokenizer_revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            enable_lora=True,
            max_loras=cfg.adapter_slots,
            max_lora_rank=self.max_lora_rank,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.slots = AdapterSlots(self.llm.llm_engine, cfg.adapter_slots, LoRARequest)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        seeds: list[int] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        adapters: list[str | None] | None = None,
    ) -> list[str]:
        """As `seal.models.generate` (greedy without seeds); prompt i through adapter folder adapters[i]."""
        from vllm import SamplingParams

        params = [
            SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
            if seeds is None
            else SamplingParams(
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seeds[i]
            )
            for i in range(len(prompts))
        ]
        # Token ids, so that vLLM adds no BOS token to a prompt whose chat template wrote one already.
        encoded = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        adapters = adapters or [None] * len(prompts)
        texts: list[str] = [""] * len(prompts)
        for rows in waves(adapters, self.slots.size):
            requests: dict[str, Any] = {}
            try:
                # Inside the try: when an adapter fails to load, those acquired before it are released.
                for path in dict.fromkeys(adapters[i] for i in rows):
                    if path:
                        requests[path] = self.slots.acquire(path)
                outputs = self.llm.generate(
                    [encoded[i] for i in rows],
                    [params[i] for i in rows],
                    lora_request=[requests.get(adapters[i]) for i in rows],
                    use_tqdm=False,
                )
            finally:
                for request in requests.values():
                    self.slots.release(request)
            for i, output in zip(rows, outputs, strict=True):
                texts[i] = output.outputs[0].text.strip()
        return texts

    def restart(self, model_dir: str) -> None:
        """Serve other weights (the generator after a round, saved to a local folder, so without a Hub
        revision): vLLM cannot swap a model's weights in place. The old engine is shut down first, so that
        the two never hold their share of the GPU at once."""
        self.close()
        self.__init__(
            model_dir,
            self.cfg,
            self.max_lora_rank,
            self.seed,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )

    def close(self) -> None:
        """Free the engine's GPU memory. vLLM has no close common to its versions: shut the engine down where
        it offers a way (`LLM.shutdown` in recent versions, else the V1 engine core's `shutdown`), drop every
        reference to it (the adapter slots hold its LLMEngine too), collect what referred to it in cycles,
        and hand the freed blocks of PyTorch's cache back to the GPU."""
        llm, self.llm, self.slots, self.tokenizer = self.llm, None, None, None
        if llm is not None:
            shutdown = getattr(llm, "shutdown", None)
            if shutdown is None:
                core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                shutdown = getattr(core, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm, shutdown
        gc.collect()
        torch.cuda.empty_cache()


def open_engine(cfg: Config) -> VLLMEngine | None:
    """The run's vLLM engine on the model's weights, or None for the hf backend. Settings that cannot work
    with vLLM fail here, at start; a machine without vLLM or a GPU falls back to hf with a warning."""
    backend = cfg.generation.backend
    if backend == "hf":
        return None
    if backend != "vllm":
        raise ValueError(f"unknown generation.backend {backend!r}: expected hf or vllm")
    if cfg.executor.name != "local":
        raise ValueError("generation.backend=vllm runs in the driver: use it with executor=local")
    if cfg.rl.name == "rest_em" and cfg.rl.learner != "updated":
        # One engine serves the generator's weights; rl.learner=golden would need a second one.
        raise ValueError("generation.backend=vllm needs rl.learner=updated (the engine serves one model)")
    reason = unavailable()
    if reason is not None:
        log.warning("generation.backend=vllm: %s; generating with transformers (backend hf) instead", reason)
        return None
    model = cfg.model
    # The weights' dtype as `seal.models.load_model` resolves it, so both backends run the same model.
    dtype, _ = resolve_dtypes(model, resolve_device(model.device))
    return VLLMEngine(
        weights_folder(model, cfg.paths.cache_dir),
        cfg.generation,
        cfg.adapt.rank,
        cfg.seed,
        dtype=str(dtype).removeprefix("torch."),
        # A revision names a version on the Hub; the bundled model is served from a local folder.
        revision=None if model.gguf_package else model.revision,
        trust_remote_code=model.trust_remote_code,
    )
