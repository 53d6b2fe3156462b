"""The settings of a cache build (`moekd cache build`): each flag's default and help, written once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from moekd.errors import MoekdError
from moekd.options import data_field_parts, option, read_recorded
from moekd.routing.policies import POLICY_PARTS
from moekd.store.layout import BUILD_DIR, POSITIONS_PER_SHARD
from moekd.store.writer import store_state

OPTIONS_FILE = "options.json"  # in the build directory of an unfinished store
NOT_RECORDED = ("resume", "overwrite", "shard")  # how this job runs, not what the store holds


@dataclass
class BuildOptions:
    teacher: str = option(help="Teacher checkpoint: a local Hugging Face directory (or a hub id when online).")
    data: str = option(help="Instruction data: .jsonl, .json, .parquet or a datasets save_to_disk directory.")
    out: str = option(help="Store to write, e.g. run.zarr.")
    policy: str = option(
        "topk", "Teacher routing policy: topk, all, ka, topp, mc, sar (all experts under the routers of --router)."
    )
    policy_params: dict = option(default_factory=dict, help="the policy's parameters", parts=POLICY_PARTS)
    encoding: str = option(
        "topk",
        "What is stored per position and sample: topk (k largest + tail), sampled (random-sampling KD draws) or hidden (final hidden state + the output layer once: exact).",
    )
    k: int | None = option(
        None, "topk: teacher token ids stored per position and sample, plus a tail bucket (default 64)."
    )
    logprob_scale: float | None = option(
        None, "topk: log-prob quantisation steps per nat; error 1/(2 x scale) nat (default 256)."
    )
    draws: int | None = option(None, "sampled: token ids drawn with replacement per position and sample (default 32).")
    proposal_temp: float | None = option(
        None, "sampled: draw from p^t renormalised (default 1); t != 1 also stores what importance weights need."
    )
    hidden_dtype: str | None = option(
        None, "hidden: bf16 (default), fp8 (e4m3, one scale per row) or fp32 (exact for a float32 teacher)."
    )
    max_prompt_len: int = option(
        256, "Longest prompt in tokens; longer rows are an error (or skipped with --skip-invalid)."
    )
    max_len: int = option(512, "Longest prompt+response in tokens; longer responses are truncated and counted.")
    dtype: str = option("auto", "Teacher dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    batch_tokens: int = option(8192, "Padded tokens per teacher forward.")
    seed: int = option(0, "Base seed; each (example, sample) draws from its own seed derived from it.")
    resume: bool = option(
        False, "Continue an unfinished build (same settings required), or start one if there is none."
    )
    overwrite: bool = option(False, "Replace an existing store at --out.")
    tokenizer: str | None = option(None, "Tokenizer directory, when it is not in the teacher's.")
    chat_template: bool = option(
        False, "Build prompts with the tokenizer's chat template instead of the Dolly template."
    )
    fields: dict = option(default_factory=dict, help="the fields of a row", parts=data_field_parts())
    skip_invalid: bool = option(False, "Leave out bad or over-long rows (counted in the summary) instead of stopping.")
    max_examples: int | None = option(None, "Use only the first N rows of --data (a smoke run).")
    positions_per_shard: int = option(
        POSITIONS_PER_SHARD, "Stored positions per shard file, the unit of resumable work."
    )
    router_probs: str = option(
        "none", "Also store each MoE layer's gate distribution: none, full, or top-R (R largest + rest mass)."
    )
    router: str | None = option(None, "sar: the router file of `moekd sar train` (checked against the teacher).")
    shard: str | None = option(
        None,
        "I/N: this job writes the I-th of N shares of the units (job arrays; same flags in every job); then run `moekd cache finalize`.",
    )


def recorded_options(o: BuildOptions) -> dict[str, bytes]:
    """The build's options as a file of its plan, so that `cache build --out STORE --resume` needs no other flag."""
    kept = {k: v for k, v in asdict(o).items() if k not in NOT_RECORDED}
    return {OPTIONS_FILE: json.dumps(kept, indent=1, sort_keys=True).encode()}


def recorded_build(values: dict) -> dict | None:
    """The options the unfinished store at --out was started with, when it is being resumed."""
    if not (values.get("resume") and values.get("out")):
        return None
    recorded = read_recorded(Path(values["out"]) / BUILD_DIR / OPTIONS_FILE)
    if recorded is None and values.get("teacher") is None and store_state(Path(values["out"])) == "complete":
        raise MoekdError(f"--resume: {values['out']} is a complete cache; there is nothing to resume")
    return recorded
