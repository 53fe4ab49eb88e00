"""The in-process generators under a deadline, and the transformers generator's
out-of-memory path (retry outside the `except` block, the fitting batch size remembered)."""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import torch

from prover.generators import FixedTacticGenerator
from prover.generators.transformers_gen import GeneratorOutOfMemory, TransformersGenerator
from search.types import GeneratorError, GeneratorTimeout

STATES = ["a : Nat\n⊢ a = a", "⊢ True", "p : Prop\n⊢ p → p", "⊢ 1 + 1 = 2"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> TransformersGenerator:
    torch.manual_seed(0)
    return TransformersGenerator("tiny-qwen2", device="cpu", max_new_tokens=4)


def test_fixed_generator_takes_the_deadline() -> None:
    assert FixedTacticGenerator(["simp"]).propose(["⊢ True"], 1, timeout_s=0.5)[0][0].tactic == "simp"


def test_oom_retry_releases_the_failed_attempts_tensors(tiny, monkeypatch) -> None:
    """Each failed attempt allocates a stand-in activation; by the time the retry runs, it
    must be gone (today the retry ran inside `except`, whose traceback kept it alive)."""
    real = tiny._generate_batch
    refs: list[weakref.ref] = []
    alive_at_retry: list[int] = []
    sizes: list[int] = []

    def fits_two(states, k):
        sizes.append(len(states))
        alive_at_retry.append(sum(r() is not None for r in refs))
        activation = torch.empty(len(states), 1024)  # what a real forward would hold
        refs.append(weakref.ref(activation))
        if len(states) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(states, k)

    monkeypatch.setattr(tiny, "_generate_batch", fits_two)
    monkeypatch.setattr(tiny.stats, "fitting_batch_states", None, raising=False)
    rows = tiny.generate(STATES, 2)
    assert len(rows) == 4 and all(len(r) == 2 for r in rows)
    assert sizes == [4, 2, 2]
    assert alive_at_retry == [0, 0, 0]  # no earlier attempt's tensor survives into the next one
    assert tiny.stats.fitting_batch_states == 2

    sizes.clear()
    tiny.generate(STATES, 2)  # the size that worked is remembered: no new OOM
    assert sizes == [2, 2]


def test_oom_on_one_state_is_a_generator_error_naming_the_cause(tiny, monkeypatch) -> None:
    def never_fits(states, k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(tiny, "_generate_batch", never_fits)
    monkeypatch.setattr(tiny.stats, "fitting_batch_states", None, raising=False)
    with pytest.raises(GeneratorOutOfMemory, match="Tried to allocate 2.00 GiB") as info:
        tiny.generate(STATES[:2], 2)
    assert isinstance(info.value, GeneratorError) and not info.value.transient
    assert info.value.__context__ is None  # nothing of the failed attempt rides along


def test_a_busy_model_times_out_at_the_deadline(tiny) -> None:
    with tiny._lock:  # another search's call holds the model
        started = time.monotonic()
        with pytest.raises(GeneratorTimeout, match="busy"):
            tiny.propose(STATES[:1], 1, timeout_s=0.2)
        assert 0.15 <= time.monotonic() - started < 1.0


def test_decoding_stops_at_the_deadline(monkeypatch) -> None:
    slow = TransformersGenerator("tiny-qwen2", device="cpu", max_new_tokens=64)
    seen: list[float] = []
    real_generate = slow.model.generate

    def generate(*args, **kwargs):
        seen.append(kwargs.get("max_time"))
        time.sleep(0.3)  # a decode longer than the time left
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(slow.model, "generate", generate)
    with pytest.raises(GeneratorTimeout, match="deadline"):
        slow.propose(STATES[:1], 1, timeout_s=0.2)
    assert seen and 0 < seen[0] <= 0.2  # transformers' own MaxTimeCriteria gets the time left
    assert slow.propose(STATES[:1], 1)[0]  # without a deadline it answers


def test_no_time_left_raises_at_once(tiny) -> None:
    with pytest.raises(GeneratorTimeout):
        tiny.propose(STATES[:1], 1, timeout_s=0.0)


def test_lock_is_released_after_a_timeout(tiny) -> None:
    done = threading.Event()

    def hold() -> None:
        with tiny._lock:
            done.wait(0.3)

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.05)
    with pytest.raises(GeneratorTimeout):
        tiny.propose(STATES[:1], 1, timeout_s=0.05)
    done.set()
    t.join()
    assert tiny.propose(STATES[:1], 1, timeout_s=30.0)[0]


def test_vllm_offline_engine_waits_and_answers_within_the_deadline(monkeypatch) -> None:
    """The offline engine cannot be interrupted: a busy engine times out waiting, and an
    answer finished past the deadline is dropped (GeneratorTimeout), never returned late."""
    from types import SimpleNamespace

    from prover.generators.vllm_gen import VLLMGenerator

    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: [1, 2, 3], eos_token_id=0)
    gen = VLLMGenerator("unused", name="v", llm=SimpleNamespace(get_tokenizer=lambda: tokenizer))
    with gen._lock:
        with pytest.raises(GeneratorTimeout, match="busy"):
            gen.propose(["⊢ True"], 1, timeout_s=0.1)

    def slow(states, prompts, k):
        time.sleep(0.3)
        return [[] for _ in states]

    monkeypatch.setattr(gen, "_generate_locked", slow)
    with pytest.raises(GeneratorTimeout, match="after the search's deadline"):
        gen.propose(["⊢ True"], 1, timeout_s=0.1)
    assert gen.propose(["⊢ True"], 1, timeout_s=5.0) == [[]]
