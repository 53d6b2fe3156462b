"""Prompt template and tokenization: one record becomes prompt tokens followed by response tokens.

Alignment convention used everywhere in moekd: a stored distribution at position t of an
example predicts token t+1. For an example of L tokens whose prompt has `prompt_len` tokens,
the target positions are prompt_len-1 .. L-2, one per response token (EOS included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moekd.data.batches import response_positions
from moekd.data.records import Record
from moekd.errors import MoekdError

DOLLY_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DOLLY_TEMPLATE_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)


def format_prompt(record: Record, tokenizer=None, chat_template: bool = False) -> str:
    """The prompt text for a record: Dolly template, or the tokenizer's chat template."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise MoekdError(
                "--chat-template: the tokenizer has no chat template; drop the flag to use the Dolly template"
            )
        content = record.instruction if not record.context else f"{record.instruction}\n\n{record.context}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    template = DOLLY_TEMPLATE_WITH_CONTEXT if record.context else DOLLY_TEMPLATE
    return template.format(instruction=record.instruction, context=record.context)


@dataclass
class TokenizedExample:
    input_ids: np.ndarray  # int32 [L]: prompt then response (EOS-terminated unless truncated)
    prompt_len: int
    source_index: int

    @property
    def target_positions(self) -> np.ndarray:
        """Positions whose next token is a response token (position t predicts token t+1)."""
        return response_positions(self.prompt_len, len(self.input_ids)).astype(np.int32)


@dataclass
class TokenizeReport:
    examples: list[TokenizedExample]
    truncated_responses: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def prompt_ids(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    # A chat template already carries its special tokens; the Dolly prompt gets the tokenizer's own (BOS).
    return tokenizer(prompt, add_special_tokens=not chat_template)["input_ids"]


def tokenize_records(
    records: list[Record],
    source_index: list[int],
    tokenizer,
    max_prompt_len: int,
    max_len: int,
    chat_template: bool = False,
    skip_invalid: bool = False,
) -> TokenizeReport:
    """Tokenize records; responses longer than fits in `max_len` are truncated and counted."""
    if tokenizer.eos_token_id is None:
        raise MoekdError("tokenizer: it defines no eos_token; set one in the checkpoint's tokenizer_config.json")
    if max_prompt_len < 1:
        raise MoekdError(f"--max-prompt-len must be at least 1, got {max_prompt_len}")
    if max_len <= max_prompt_len:
        raise MoekdError(f"--max-len ({max_len}) must exceed --max-prompt-len ({max_prompt_len})")
    report = TokenizeReport([])
    for record, index in zip(records, source_index):
        p_ids = prompt_ids(tokenizer, format_prompt(record, tokenizer, chat_template), chat_template)
        if len(p_ids) > max_prompt_len:
            if skip_invalid:
                report.skipped["prompt_too_long"] = report.skipped.get("prompt_too_long", 0) + 1
                continue
            raise MoekdError(
                f"--data row {index}: the prompt is {len(p_ids)} tokens, over --max-prompt-len {max_prompt_len}; "
                "raise --max-prompt-len or pass --skip-invalid to leave such rows out"
            )
        r_ids = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_len - len(p_ids)
        if len(r_ids) > room:
            r_ids = r_ids[:room]
            report.truncated_responses += 1
        ids = np.asarray(p_ids + r_ids, dtype=np.int32)
        report.examples.append(TokenizedExample(ids, len(p_ids), index))
    if not report.examples:
        raise MoekdError(f"--data: no row fits --max-prompt-len {max_prompt_len} ({report.skipped})")
    return report
