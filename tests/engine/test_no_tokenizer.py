"""A model folder without tokenizer files serves token-id prompts (like vLLM's
skip_tokenizer_init); a text prompt gets an error naming the files it lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecoserve import LLM, SamplingParams
from ecoserve.model.registry import resolve_model

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama's config and weights, and nothing else."""
    src = resolve_model("tiny-llama")
    out = tmp_path_factory.mktemp("bare-llama")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (out / name).symlink_to(src / name)
    return out


def test_token_ids_run_without_tokenizer_files_and_match_the_full_folder(bare_folder: Path) -> None:
    bare = LLM(model=str(bare_folder), num_kv_blocks=16)
    full = LLM(model="tiny-llama", num_kv_blocks=16)
    prompts = [[3, 4, 5, 6], [9, 8]]
    got = bare.generate(prompts, GREEDY)
    want = full.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.text == "" and len(o.token_ids) == 6 for o in got)
    bare.engine.pool.assert_no_leaks()


def test_text_prompt_without_tokenizer_names_the_missing_files(bare_folder: Path) -> None:
    bare = LLM(model=str(bare_folder), num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"has no tokenizer files \(it needs tokenizer\.json, or tokenizer\.model"):
        bare.generate("Hello there", GREEDY)
    assert not bare.engine.sequences


def test_skip_tokenizer_init_on_a_full_folder() -> None:
    llm = LLM(model="tiny-llama", num_kv_blocks=16, skip_tokenizer_init=True)
    assert llm.generate([[3, 4]], GREEDY)[0].text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init=True; give prompts as lists of token ids"):
        llm.generate("Hello", GREEDY)
