"""rewardkit.vlm.local.TransformersBackend on tiny random Qwen2-VL / Qwen3-VL / Qwen3.5 folders (offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardkit.testing.vlm import VLM_FAMILIES, VLM_MODEL_CLASSES, forced_answer_processor, tiny_qwen_vl
from rewardkit.vlm import ChatRequest, GenerationSettings, TransformersBackend

_SIZES = ((64, 64), (48, 80), (64, 64), (96, 64))  # (height, width): different image-token counts
_FORCED = "3.8</think>{[2]}"  # crosses the thinking marker (one added token), which decoding keeps


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rk-vlm-local")
    return {family: tiny_qwen_vl(root, family, seed=3) for family in VLM_FAMILIES}


@pytest.fixture(scope="module")
def backends(folders: dict[str, Path]) -> dict[str, TransformersBackend]:
    return {family: TransformersBackend(folder, batch_size=4) for family, folder in folders.items()}


def _requests(count: int = 4, max_new_tokens: int = 6, seed: int = 0, **settings) -> list[ChatRequest]:
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        height, width = _SIZES[i % len(_SIZES)]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        content = [{"type": "image", "image": image}, {"type": "text", "text": "Rate this image. " * (i + 1)}]
        requests.append(ChatRequest([{"role": "user", "content": content}],
                                    GenerationSettings(max_new_tokens=max_new_tokens, **settings)))
    return requests


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_batched_generation_equals_one_at_a_time(backends: dict[str, TransformersBackend], family: str) -> None:
    backend = backends[family]
    requests = _requests()
    batched = backend.generate(requests)
    single = [backend.generate([request])[0] for request in requests]
    assert type(backend.model).__name__ == VLM_MODEL_CLASSES[family]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(isinstance(c.text, str) and c.error is None for c in batched)
    # Non-degenerate tiny weights: different images and prompts give different greedy answers.
    assert len({c.text for c in batched}) > 1


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_forced_answer_comes_back_exactly(folders: dict[str, Path], family: str) -> None:
    holder: dict[str, TransformersBackend] = {}
    backend = TransformersBackend(folders[family], batch_size=2,
                                  logits_processor_factory=lambda: forced_answer_processor(holder["b"].processor, _FORCED))
    holder["b"] = backend
    completions = backend.generate(_requests(2, max_new_tokens=40))
    assert [c.text for c in completions] == [_FORCED] * 2


def test_mixed_settings_are_grouped_but_answers_keep_request_order(backends: dict[str, TransformersBackend]) -> None:
    backend = backends["qwen2_vl"]
    short, long = _requests(3, max_new_tokens=2), _requests(3, max_new_tokens=5)
    mixed = [short[0], long[1], short[2], long[0]]
    expected = [backend.generate([r])[0].text for r in mixed]
    assert [c.text for c in backend.generate(mixed)] == expected
    assert all(len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 2 for t in expected[::2])


def test_generate_kwargs_follow_the_settings(backends: dict[str, TransformersBackend],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backends["qwen2_vl"]
    seen: list[dict] = []
    original = backend.model.generate

    def spy(**kwargs):
        seen.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        return original(**kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    backend.generate(_requests(1, max_new_tokens=3) + _requests(1, max_new_tokens=3, repetition_penalty=1.05))
    tokenizer = backend.tokenizer
    assert seen[0] == {"do_sample": False, "max_new_tokens": 3, "pad_token_id": tokenizer.pad_token_id,
                       "eos_token_id": tokenizer.eos_token_id}
    assert seen[1]["repetition_penalty"] == 1.05


def test_left_padding_thinking_template_and_restored_padding_side(backends: dict[str, TransformersBackend]) -> None:
    backend = backends["qwen3_5"]
    tokenizer = backend.tokenizer
    before = tokenizer.padding_side
    requests = _requests(2)
    default = backend.encode(requests, GenerationSettings())
    assert tokenizer.padding_side == before
    mask = default["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # the shorter prompt is padded on the left
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(default["input_ids"][1]).endswith("<|im_start|>assistant\n<think>\n")
    off = backend.encode(requests, GenerationSettings(enable_thinking=False))
    assert decode(off["input_ids"][1]).endswith("assistant\n<think>\n\n</think>\n\n")
    qwen2 = backends["qwen2_vl"].encode(requests[:1], GenerationSettings())
    text = backends["qwen2_vl"].tokenizer.decode(qwen2["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_offload_and_onload_move_the_model(folders: dict[str, Path]) -> None:
    backend = TransformersBackend(folders["qwen3_vl"])
    assert "not loaded" in repr(backend)
    backend.offload()  # nothing loaded yet: a no-op
    reference = backend.generate(_requests(1))[0].text
    backend.offload()
    assert "offloaded" in repr(backend) and next(backend.model.parameters()).device.type == "cpu"
    assert backend.generate(_requests(1))[0].text == reference  # generate onloads by itself
    backend.onload()
    assert next(backend.model.parameters()).device == backend.device and "loaded" in repr(backend)


def test_bf16_generation_runs(folders: dict[str, Path]) -> None:
    backend = TransformersBackend(folders["qwen2_vl"], dtype="bf16")
    completion = backend.generate(_requests(2, max_new_tokens=3))
    assert backend.model.dtype == torch.bfloat16 and all(isinstance(c.text, str) for c in completion)
    assert TransformersBackend(folders["qwen2_vl"]).torch_dtype == torch.float32


def test_explicit_model_class_and_processor_kwargs(folders: dict[str, Path]) -> None:
    backend = TransformersBackend(folders["qwen3_5"], model_class="Qwen3_5ForConditionalGeneration",
                                  processor_kwargs={"size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 4}})
    inputs = backend.encode(_requests(1), GenerationSettings())
    assert type(backend.model).__name__ == "Qwen3_5ForConditionalGeneration"
    assert inputs["image_grid_thw"].prod().item() <= 16  # the smaller pixel limit reached the processor


def test_bad_model_specs_and_arguments_raise(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransformersBackend(tmp_path / "missing").generate(_requests(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        TransformersBackend(tmp_path / "empty").load()
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        TransformersBackend("hf:nobody/no-such-vlm").load()  # offline in tests: never downloads
    with pytest.raises(ValueError, match="no model class 'NotAModel'"):
        TransformersBackend(folders["qwen2_vl"], model_class="NotAModel").load()
    with pytest.raises(ValueError, match="batch_size"):
        TransformersBackend(folders["qwen2_vl"], batch_size=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        TransformersBackend(folders["qwen2_vl"], dtype="int3")
    with pytest.raises(ValueError, match="not both"):
        TransformersBackend(folders["qwen2_vl"], device="cpu", device_map="auto")
    with pytest.raises(TypeError, match="expected rewardkit.vlm.ChatRequest"):
        TransformersBackend(folders["qwen2_vl"]).generate(["hello"])  # type: ignore[list-item]
    assert TransformersBackend(folders["qwen2_vl"]).generate([]) == []


def test_device_map_placement_loads_and_refuses_offload(folders: dict[str, Path]) -> None:
    backend = TransformersBackend(folders["qwen2_vl"], device_map={"": "cpu"})
    assert isinstance(backend.generate(_requests(1, max_new_tokens=2))[0].text, str)
    with pytest.raises(RuntimeError, match="device_map"):
        backend.offload()


def test_out_of_memory_batches_are_split_then_fail_per_request(backends: dict[str, TransformersBackend],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backends["qwen2_vl"]
    requests = _requests(3, max_new_tokens=2)
    expected = [c.text for c in backend.generate(requests)]
    real, sizes = backend._generate_batch, []

    def tight(batch, settings):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, settings)

    monkeypatch.setattr(backend, "_generate_batch", tight)
    assert [c.text for c in backend.generate(requests)] == expected
    assert sizes == [3, 1, 2, 1, 1]

    def none_fits(batch, settings):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(backend, "_generate_batch", none_fits)
    failed = backend.generate(requests[:2])
    assert all(c.text is None and c.error.startswith("out of memory: CUDA out of memory") for c in failed)
