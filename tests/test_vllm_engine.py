"""generation.backend=vllm without vLLM: the adapter-slot bookkeeping against a fake engine that behaves as
vLLM's does, the grouping of rows into engine calls, the PEFT folders the engine would load (checked with
PEFT itself), the fallback to transformers when vLLM or a GPU is missing, and `VLLMEngine` itself on a fake
`vllm` module: what it asks of `LLM`, the prompts it hands over, and its restart."""

import logging
import sys
import types
import weakref
from types import SimpleNamespace

import pytest
from peft import PeftModel
from transformers import AutoTokenizer

from seal.adapt import UpdateJob
from seal.config import AdaptConfig, GenerationConfig
from seal.models import LM, _bundled_cfg, cached_bundled_model, continuation_logprobs
from seal.multilora import MultiLoraUpdater
from seal.vllm_engine import AdapterSlots, VLLMEngine, export_adapter, open_engine, unavailable, waves
from tests.conftest import CACHE_DIR, TINY_OVERRIDES, load_tiny, make_cfg


class Request:
    def __init__(self, name: str, lora_int_id: int, lora_path: str):
        self.lora_name, self.lora_int_id, self.lora_path = name, lora_int_id, lora_path


class FakeEngine:
    """vLLM's LLMEngine as far as adapters go: at most `max_loras` loaded, keyed by their integer id. Adding
    an id that is loaded already would keep serving the old weights, so it is an error here."""

    def __init__(self, max_loras: int):
        self.max_loras, self.adapters, self.ever = max_loras, {}, set()

    def add_lora(self, request: Request) -> bool:
        assert request.lora_int_id not in self.adapters, f"id {request.lora_int_id} is still loaded"
        assert len(self.adapters) < self.max_loras, "the engine's adapter slots are exhausted"
        self.adapters[request.lora_int_id] = request.lora_path
        self.ever.add(request.lora_int_id)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        return self.adapters.pop(lora_id, None) is not None

    def list_loras(self) -> set[int]:
        return set(self.adapters)


def test_a_fixed_pool_of_ids_serves_any_number_of_adapters_without_growing():
    engine = FakeEngine(max_loras=3)
    slots = AdapterSlots(engine, 3, Request)
    for i in range(50):
        request = slots.acquire(f"/adapters/{i}")
        assert engine.adapters[request.lora_int_id] == f"/adapters/{i}"  # served what was asked for
        slots.release(request)
        assert len(engine.list_loras()) <= 3
    assert engine.ever == {1, 2, 3} and slots.loads == 50
    # The three most recent are still loaded: asking again loads nothing.
    again = slots.acquire("/adapters/48")
    assert slots.loads == 50 and engine.adapters[again.lora_int_id] == "/adapters/48"


def test_the_least_recently_used_free_adapter_is_replaced_and_held_ones_never_are():
    engine = FakeEngine(max_loras=2)
    slots = AdapterSlots(engine, 2, Request)
    a, b = slots.acquire("a"), slots.acquire("b")
    slots.release(a)
    slots.release(b)
    slots.release(slots.acquire("a"))  # a is now more recent than b
    c = slots.acquire("c")
    assert c.lora_int_id == b.lora_int_id and set(engine.adapters.values()) == {"a", "c"}
    held = slots.acquire("a")
    with pytest.raises(RuntimeError, match="all 2 adapter slots are held by running requests"):
        slots.acquire("d")
    slots.release(held)
    slots.release(c)
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        slots.release(c)


def test_rows_are_grouped_into_calls_of_at_most_size_distinct_adapters_base_rows_first():
    assert waves(["a", None, "b", "a", "c", None, "d"], 2) == [[0, 1, 2, 3, 5], [4, 6]]
    assert waves([None, None], 2) == [[0, 1]]
    assert waves(["a", "b", "c"], 1) == [[0], [1], [2]]


def test_an_exported_adapter_loads_in_peft_and_scores_as_the_trained_one(tmp_path):
    cfg = AdaptConfig(rank=4, alpha=8, epochs=3, lr=1e-2)
    lm = load_tiny()
    updater = MultiLoraUpdater(lm, cfg, capacity=1)
    [adapter] = updater.train([UpdateJob("job", ["The Corvane cell stores sodium in layered salt."], 1)])
    folder = export_adapter(adapter, cfg, tmp_path / "adapter")

    prompts, continuations = ["The Corvane cell stores"], [" sodium in layered salt."]
    ours = updater.score(prompts, continuations, [adapter])
    base = updater.score(prompts, continuations, [None])
    fresh = load_tiny()
    peft = PeftModel.from_pretrained(fresh.model, folder).eval()
    theirs = continuation_logprobs(
        LM(peft, fresh.tokenizer, fresh.device, "plain", None), prompts, continuations
    )
    assert theirs[0][0] == pytest.approx(ours[0][0], abs=1e-4)
    assert ours[0][0] > base[0][0] + 0.5  # the adapter matters, so a folder PEFT ignored would fail above


def test_vllm_settings_are_checked_at_start_and_a_machine_without_it_falls_back(tmp_path, caplog):
    def cfg(*overrides):
        from omegaconf import OmegaConf

        return OmegaConf.to_object(make_cfg(tmp_path, *TINY_OVERRIDES, *overrides))

    assert open_engine(cfg()) is None  # hf, the default
    with pytest.raises(ValueError, match="unknown generation.backend 'tgi'"):
        open_engine(cfg("generation.backend=tgi"))
    with pytest.raises(ValueError, match="use it with executor=local"):
        open_engine(cfg("generation.backend=vllm", "executor=ray"))
    with pytest.raises(ValueError, match="needs rl.learner=updated"):
        open_engine(cfg("generation.backend=vllm", "rl=rest_em", "rl.learner=golden"))
    reason = unavailable()
    if reason is None:
        pytest.skip("vLLM and a GPU are here: the fallback is not taken")
    with caplog.at_level(logging.WARNING, logger="seal.vllm_engine"):
        assert open_engine(cfg("generation.backend=vllm")) is None
    assert (
        f"generation.backend=vllm: {reason}; generating with transformers (backend hf) instead" in caplog.text
    )


class FakeLLMEngine(FakeEngine):
    """vLLM's V1 LLMEngine: adapters as FakeEngine keeps them, and an engine core that holds the GPU until it
    is shut down (it then notes its model in `shut`, a list the whole fake module shares)."""

    def __init__(self, max_loras: int, model: str, shut: list[str]):
        super().__init__(max_loras)
        self.engine_core = SimpleNamespace(shutdown=lambda: shut.append(model))


class FakeVLLM:
    """A `vllm` module with `LLM`, `SamplingParams` and `vllm.lora.request.LoRARequest` as VLLMEngine uses
    them. Each LLM notes its model and options and, as it starts, which earlier engines are still referenced
    (`alive`) and which were shut down (`shut`): a real one would find the GPU memory of the others taken.
    `generate` encodes a text prompt as vLLM does (with special tokens), keeps the ids it was given in
    `prompts`, and answers each prompt with the engine's model."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shut, self.made, self.engines = tokenizer, [], [], []
        fake = self

        class LLM:
            def __init__(self, model: str, **options):
                alive = [ref() is not None for ref in fake.engines]
                fake.made.append(dict(model=model, options=options, alive=alive, shut=list(fake.shut)))
                self.model, self.prompts = model, []
                self.llm_engine = FakeLLMEngine(options["max_loras"], model, fake.shut)
                fake.engines.append(weakref.ref(self.llm_engine))

            def get_tokenizer(self):
                return fake.tokenizer

            def generate(self, prompts, params, lora_request=None, use_tqdm=True):
                assert self.model not in fake.shut, "generating on an engine that was shut down"
                assert len(prompts) == len(params) == len(lora_request)
                for p in prompts:
                    self.prompts.append(
                        p["prompt_token_ids"] if isinstance(p, dict) else fake.tokenizer.encode(p)
                    )
                return [SimpleNamespace(outputs=[SimpleNamespace(text=f" {self.model} ")]) for _ in prompts]

        self.module = types.ModuleType("vllm")
        self.module.LLM = LLM
        self.module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
        self.lora = types.ModuleType("vllm.lora")
        self.request = types.ModuleType("vllm.lora.request")
        self.request.LoRARequest = Request

    def install(self, monkeypatch) -> None:
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.lora", self.lora)
        monkeypatch.setitem(sys.modules, "vllm.lora.request", self.request)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The bundled tokenizer set to add its BOS token, <|im_start|>, which also opens its chat template: as
    Llama 3's tokenizer adds <|begin_of_text|>, which its chat template writes too."""
    tokenizer = AutoTokenizer.from_pretrained(
        cached_bundled_model(_bundled_cfg(), CACHE_DIR), add_bos_token=True
    )
    assert (
        tokenizer.encode("x")[0]
        == tokenizer.bos_token_id
        != tokenizer.encode("x", add_special_tokens=False)[0]
    )
    return tokenizer


@pytest.fixture
def fake_vllm(monkeypatch, bos_tokenizer):
    fake = FakeVLLM(bos_tokenizer)
    fake.install(monkeypatch)
    return fake


def generation_cfg(slots: int = 2) -> GenerationConfig:
    return GenerationConfig(backend="vllm", adapter_slots=slots)


def test_a_restart_shuts_the_old_engine_down_and_drops_it_before_the_new_one_starts(fake_vllm):
    engine = VLLMEngine("/weights/base", generation_cfg(), 16, 3)
    assert engine.generate(["Hi"], max_new_tokens=4, adapters=["/a"]) == ["/weights/base"]
    engine.restart("/runs/round_0/generator")
    base, round_0 = fake_vllm.made
    assert round_0["shut"] == ["/weights/base"]  # shut down before the new engine started
    assert round_0["alive"] == [False]  # and no longer referenced (the adapter slots held it)
    assert engine.generate(["Hi"], max_new_tokens=4, adapters=["/a"]) == ["/runs/round_0/generator"]
    engine.close()
    assert fake_vllm.shut == ["/weights/base", "/runs/round_0/generator"]
    assert [ref() for ref in fake_vllm.engines] == [None, None]


def test_prompts_reach_vllm_as_token_ids_without_a_second_bos(fake_vllm, bos_tokenizer):
    engine = VLLMEngine("/weights/base", generation_cfg(), 8, 0)
    prompts = [
        bos_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("Where is the Corvane cell made?", "What does it store?")
    ]
    engine.generate(prompts, max_new_tokens=4, seeds=[1, 2], adapters=[None, "/a"])
    seen = engine.llm.prompts
    assert seen == [bos_tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    bos = bos_tokenizer.bos_token_id
    assert all(ids[0] == bos != ids[1] for ids in seen)  # the template's BOS, once


def test_the_model_configs_revision_remote_code_and_dtype_reach_vllm_and_survive_a_restart(
    fake_vllm, monkeypatch, tmp_path
):
    from omegaconf import OmegaConf

    monkeypatch.setattr("seal.vllm_engine.unavailable", lambda: None)  # no GPU here: pretend there is one
    settings = ("generation.backend=vllm", "model.device=cpu", "seed=7")
    hub = (
        "model=hf",
        "model.name_or_path=org/model",
        "model.revision=abc123",
        "model.trust_remote_code=true",
    )
    cfg = OmegaConf.to_object(make_cfg(tmp_path, *settings, *hub, "model.dtype=float16"))
    engine = open_engine(cfg)
    asked = ("revision", "tokenizer_revision", "trust_remote_code", "dtype", "seed")
    made = fake_vllm.made[-1]
    assert made["model"] == "org/model"
    assert {k: made["options"].get(k) for k in asked} == {
        "revision": "abc123",
        "tokenizer_revision": "abc123",
        "trust_remote_code": True,
        "dtype": "float16",
        "seed": 7,
    }
    # The generator saved after a round is a local folder: no revision, the rest as before.
    engine.restart(str(tmp_path / "generator"))
    made = fake_vllm.made[-1]
    assert made["model"] == str(tmp_path / "generator")
    assert {k: made["options"].get(k) for k in asked} == {
        "revision": None,
        "tokenizer_revision": None,
        "trust_remote_code": True,
        "dtype": "float16",
        "seed": 7,
    }
    engine.close()
    # The bundled model is served from its local folder, where a revision means nothing; dtype=auto resolves
    # as `load_model` resolves it (on the CPU: model.cpu_dtype).
    cfg = OmegaConf.to_object(make_cfg(tmp_path, *settings, "model.revision=abc123"))
    open_engine(cfg).close()
    made = fake_vllm.made[-1]
    assert made["model"] == str(cached_bundled_model(cfg.model, CACHE_DIR))
    assert {k: made["options"].get(k) for k in asked} == {
        "revision": None,
        "tokenizer_revision": None,
        "trust_remote_code": False,
        "dtype": "float32",
        "seed": 7,
    }


def test_the_engines_lora_rank_is_rounded_up_to_one_vllm_accepts(fake_vllm):
    ranks = {1: 8, 4: 8, 8: 8, 9: 16, 32: 32, 48: 64, 64: 64, 200: 256, 300: 320, 512: 512}
    for rank in ranks:
        VLLMEngine("/weights/base", generation_cfg(), rank, 0)
    assert [made["options"]["max_lora_rank"] for made in fake_vllm.made] == list(ranks.values())
    with pytest.raises(ValueError, match="adapt.rank=600: vLLM serves LoRA adapters of rank at most 512"):
        VLLMEngine("/weights/base", generation_cfg(), 600, 0)


def test_an_adapter_that_fails_to_load_releases_those_acquired_before_it_in_its_wave(fake_vllm):
    engine = VLLMEngine("/weights/base", generation_cfg(slots=2), 8, 0)
    add = engine.slots.engine.add_lora
    engine.slots.engine.add_lora = lambda request: request.lora_path != "/broken" and add(request)
    with pytest.raises(RuntimeError, match="did not load the adapter /broken"):
        engine.generate(["q1", "q2"], max_new_tokens=4, adapters=["/a", "/broken"])
    assert sum(engine.slots.held.values()) == 0
    # Both slots are free for the next wave (were /a still held, the second adapter would find none).
    assert engine.generate(["q1", "q2"], max_new_tokens=4, adapters=["/b", "/c"]) == ["/weights/base"] * 2
