"""`LLM`: the offline API, shaped like vLLM's (`LLM(model=...).generate(prompts, params)`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from typing import Sequence as Seq

from tqdm.auto import tqdm

from ecoserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.params import SamplingParams
from ecoserve.envs import set_offline_hub

Prompt = str | list[int]

# A folder can load a tokenizer when it has one of these sets of files: a fast tokenizer, a
# sentencepiece model, or a byte-level BPE vocabulary with its merges (GPT-2, Qwen2).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def has_tokenizer_files(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS)


def _describe_tokenizer_files() -> str:
    return ", or ".join(" + ".join(names) for names in TOKENIZER_FILE_SETS)


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_preemptions: int


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    `model` is a built-in name (`smollm2-135m`, `tiny-llama`, `tiny-qwen2`) or a local Hugging
    Face folder of a Llama, Qwen2 or Mistral model.

    With `skip_tokenizer_init` (as in vLLM), or when the folder holds no tokenizer files, no
    tokenizer is loaded: prompts must be token ids, and outputs carry token ids with empty text.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_gib: float = 1.0,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 1024,
        seed: int = 0,
        skip_tokenizer_init: bool = False,
    ) -> None:
        set_offline_hub()
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, device=device, max_model_len=max_model_len, seed=seed),
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, kv_cache_gib=kv_cache_gib),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        )
        self.engine = LLMEngine(config)
        self._tokenizer: Any = None
        folder = Path(self.engine.folder)
        if skip_tokenizer_init:
            self._no_tokenizer = "it was built with skip_tokenizer_init=True"
        elif not has_tokenizer_files(folder):
            self._no_tokenizer = f"{folder} has no tokenizer files (it needs {_describe_tokenizer_files()})"
        else:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self._no_tokenizer = ""
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer; ValueError saying why when this LLM has none."""
        if self._tokenizer is None:
            raise ValueError(
                f"this LLM has no tokenizer: {self._no_tokenizer}; give prompts as lists of token ids, "
                "or add the tokenizer files to the model folder"
            )
        return self._tokenizer

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids for a prompt: a string (optionally wrapped in the chat template) or ids as given."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give a non-empty string or a non-empty list of token ids")
            if chat:
                if not self.tokenizer.chat_template:
                    raise ValueError(f"model {self.engine.config.model.model!r} has no chat template; drop --chat")
                ids: Any = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                # transformers 5 returns a BatchEncoding here, older releases a list of ids.
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of `prompts`.

        All prompts are validated before any is queued, so a bad one changes nothing.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int))
        prompts = cast(list[Prompt], [prompts] if single else list(prompts))
        params = self._params_list(sampling_params, len(prompts))
        encoded = [self.encode_prompt(p, chat) for p in prompts]
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        for rid, tokens, p in zip(ids, encoded, params):
            self.engine._validate(rid, tokens, p)
        for rid, tokens, p in zip(ids, encoded, params):
            self.engine.add_request(rid, tokens, p)
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished():
            bar.update(sum(o.finished for o in self.engine.step()))
        bar.close()
        return [self._output(rid, prompt) for rid, prompt in zip(ids, prompts)]

    @staticmethod
    def _params_list(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        return params

    def _output(self, rid: str, prompt: Prompt) -> RequestOutput:
        seq = self.engine.pop_finished(rid)
        tok = self._tokenizer
        text = "" if tok is None else str(tok.decode(seq.output_token_ids, skip_special_tokens=True))
        assert seq.finish_reason is not None
        return RequestOutput(
            request_id=rid,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=text,
            finish_reason=seq.finish_reason.value,
            num_preemptions=seq.num_preemptions,
        )
