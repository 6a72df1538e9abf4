"""Model registry: built-ins are built once, atomically, and reused; folders are validated; specs
read back what the configs say. Cache-mechanics tests use a private ECOSERVE_HOME each; the rest
share the session's (set by tests/conftest.py), so the real models are built at most once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ecoserve import envs
from ecoserve.model.hf_config import SUPPORTED_MODEL_TYPES, load_model_spec
from ecoserve.model.registry import (
    BUILTIN_MODELS,
    COMPLETE_MARKER,
    LOCAL_FOLDER,
    BuiltinModel,
    prepare_model,
    resolve_model,
)


@pytest.fixture
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ECOSERVE_HOME", str(tmp_path / "home"))
    return envs.models_dir()


def make_fake_builtin(
    monkeypatch: pytest.MonkeyPatch, build: Callable[[Path], None], recipe: int = 1
) -> BuiltinModel:
    fake = BuiltinModel("fake", "a stand-in whose build is instant", recipe, build)
    monkeypatch.setitem(BUILTIN_MODELS, "fake", fake)
    return fake


def assert_no_leftovers(models_dir: Path) -> None:
    temps = [p.name for p in models_dir.iterdir() if ".building-" in p.name or ".stale-" in p.name]
    assert temps == [], f"temporary build folders left behind: {temps}"


def write_config(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- building and reuse ------------------------------------------------------------------------


def test_builtin_names_have_one_line_descriptions() -> None:
    assert list(BUILTIN_MODELS) == ["tiny-llama", "tiny-qwen2", "smollm2-135m"]
    for name, builtin in BUILTIN_MODELS.items():
        assert builtin.name == name
        assert builtin.description and "\n" not in builtin.description


def test_tiny_llama_is_built_once_then_reused_and_deterministic(private_home: Path) -> None:
    # 1. First call builds into models_dir()/name, marker last, no temporaries left.
    path = prepare_model("tiny-llama")
    assert path == private_home / "tiny-llama"
    assert (path / COMPLETE_MARKER).is_file()
    assert_no_leftovers(private_home)
    weights = path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (path / COMPLETE_MARKER).stat().st_mtime_ns)
    first_digest = digest(weights)
    # 2. Second call reuses the folder untouched.
    assert resolve_model("tiny-llama") == path
    assert (weights.stat().st_mtime_ns, (path / COMPLETE_MARKER).stat().st_mtime_ns) == before
    # 3. force rebuilds, and the fixed seed gives byte-identical weights.
    time.sleep(0.01)
    assert prepare_model("tiny-llama", force=True) == path
    assert weights.stat().st_mtime_ns != before[0]
    assert digest(weights) == first_digest
    assert_no_leftovers(private_home)


def test_incomplete_or_outdated_folder_is_rebuilt(
    private_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights").write_text("new")

    fake = make_fake_builtin(monkeypatch, build, recipe=2)
    # 1. A folder without the marker (a crashed build) is replaced.
    write_config(private_home / "fake", model_type="llama")
    path = prepare_model("fake")
    assert len(calls) == 1 and (path / "weights").read_text() == "new"
    assert not (path / "config.json").exists()
    # 2. A marker from an older recipe version is not trusted either.
    marker = {"name": fake.name, "recipe": fake.recipe_version - 1}
    (path / COMPLETE_MARKER).write_text(json.dumps(marker))
    prepare_model("fake")
    assert len(calls) == 2
    # 3. The current marker is reused.
    prepare_model("fake")
    assert len(calls) == 2
    assert_no_leftovers(private_home)


def test_racing_callers_build_once(private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def slow_build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for every thread to arrive while the build runs
        (out / "weights").write_text("w")

    make_fake_builtin(monkeypatch, slow_build)
    results: list[Path] = []
    def call() -> None:
        results.append(prepare_model("fake"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [private_home / "fake"] * 4
    assert_no_leftovers(private_home)


def test_failed_build_leaves_nothing(private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    make_fake_builtin(monkeypatch, broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_model("fake")
    assert not (private_home / "fake").exists()
    assert_no_leftovers(private_home)


def test_prepare_unknown_name_lists_builtins(private_home: Path) -> None:
    with pytest.raises(ValueError, match="'gpt-5' is not a built-in model") as err:
        prepare_model("gpt-5")
    for name in BUILTIN_MODELS:
        assert name in str(err.value)


# --- resolving folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    return prepare_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_qwen2() -> Path:
    return prepare_model("tiny-qwen2")


def test_resolve_accepts_a_local_folder(tiny_llama: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my-model"
    shutil.copytree(tiny_llama, mine)
    assert resolve_model(str(mine)) == mine.resolve()
    assert resolve_model(mine) == mine.resolve()


def test_resolve_checks_sharded_weights(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "sharded", model_type="mistral")
    shards = {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (folder / shards["a.weight"]).write_bytes(b"")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        resolve_model(folder)
    no_tensors = (2).to_bytes(8, "little") + b"{}"  # a well-formed safetensors file holding nothing
    for shard in shards.values():
        (folder / shard).write_bytes(no_tensors)
    assert resolve_model(folder) == folder.resolve()
    (folder / shards["b.weight"]).write_bytes(b"")  # a header check refuses what could not be loaded
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is not a safetensors file"):
        resolve_model(folder)


def _no_config(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _gpt2_config(tmp: Path) -> Path:
    folder = write_config(tmp / "gpt2", model_type="gpt2")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _bin_weights(tmp: Path) -> Path:
    folder = write_config(tmp / "bin", model_type="llama")
    (folder / "pytorch_model.bin").write_bytes(b"")
    return folder


def _a_file(tmp: Path) -> Path:
    (tmp / "model.gguf").write_bytes(b"")
    return tmp / "model.gguf"


def _bad_json(tmp: Path) -> Path:
    (tmp / "bad").mkdir()
    (tmp / "bad" / "config.json").write_text("{not json")
    return tmp / "bad"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp / "HuggingFaceTB/SmolLM2-135M", "neither a built-in model name nor"),
        (_a_file, "is a file, not a model folder"),
        (_no_config, "has no config.json"),
        (_bad_json, "is not valid JSON"),
        (_gpt2_config, "model_type 'gpt2'"),
        (_bin_weights, r"no \*.safetensors weights \(found pytorch_model.bin"),
    ],
    ids=["unknown", "file", "no-config", "bad-json", "gpt2", "bin-weights"],
)
def test_resolve_refusals_say_what_is_accepted(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        resolve_model(str(make(tmp_path)))
    message = str(err.value)
    assert LOCAL_FOLDER in message
    for name in BUILTIN_MODELS:
        assert name in message
    if "gpt2" in problem:
        assert ", ".join(SUPPORTED_MODEL_TYPES) in message


# --- specs ---------------------------------------------------------------------------------------


def test_tiny_llama_spec(tiny_llama: Path) -> None:
    spec = load_model_spec(tiny_llama)
    assert spec.model_id == "tiny-llama" and spec.model_type == "llama"
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size) == (49152, 64, 192)
    assert (spec.num_layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 16)
    assert spec.rope_theta == 10000.0 and spec.rope_scaling is None
    assert spec.tie_word_embeddings and not spec.attention_bias and not spec.mlp_bias
    assert (spec.bos_token_id, spec.eos_token_ids) == (1, (2,))
    assert spec.dtype == "float32" and spec.torch_dtype == torch.float32
    assert spec.max_position_embeddings == 2048 and spec.sliding_window is None


def test_tiny_qwen2_spec(tiny_qwen2: Path) -> None:
    spec = load_model_spec(tiny_qwen2)
    assert spec.model_type == "qwen2" and spec.attention_bias and not spec.tie_word_embeddings
    assert (spec.num_layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (3, 4, 1, 16)
    assert spec.rope_theta == 1_000_000.0
    assert spec.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_have_varied_weights_and_outputs(name: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    assert not torch.allclose(params["model.norm.weight"], torch.ones(64))
    if name == "tiny-qwen2":
        assert params["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
        assert not torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])
    # Greedy decoding must not collapse into a repeated token, or equality tests prove little.
    prompt = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert len(set(out[0, 5:].tolist())) >= 16


def test_spec_of_legacy_mistral_config(tmp_path: Path) -> None:
    # Pre-transformers-5 layout: rope_theta and rope_scaling ("type") at top level, plus a real
    # sliding window and extra stop tokens only in generation_config.json.
    folder = write_config(
        tmp_path / "mistral",
        model_type="mistral",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=1024,
        rope_theta=500000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    spec = load_model_spec(folder, model_id="my-mistral")
    assert spec.model_id == "my-mistral"
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert spec.sliding_window == 1024
    assert spec.eos_token_ids == (2, 7)
    assert spec.head_dim == 16 and spec.dtype == "bfloat16"


def test_spec_refuses_unsupported_model_type(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "phi", model_type="phi3")
    expected = "model_type 'phi3'.*supported model types: llama, qwen2, mistral"
    with pytest.raises(ValueError, match=expected):
        load_model_spec(folder)


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_conversion_reloads_and_knows_paris() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m")
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert not {"quantization_config", "_model_name_or_path", "gguf_file"} & set(config)
    spec = load_model_spec(path)
    shape = (spec.num_layers, spec.hidden_size, spec.num_q_heads, spec.num_kv_heads)
    assert shape == (30, 576, 9, 3)
    assert (spec.bos_token_id, spec.eos_token_ids, spec.dtype) == (1, (2,), "bfloat16")

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1] :])
