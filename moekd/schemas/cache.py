"""Teacher-cache metadata, schema v1: the single source of truth for what a store holds.

Stored as the `moekd` attribute of the store's root group and exported as JSON Schema
(`teacher_cache.schema.json`) for other teams. Readers pin the major version; optional fields
added later bump the minor version, and an older reader ignores them.

1.1 added the `sampled` and `hidden` encodings (a reader of 1.0 refuses them by their `kind`);
stores of 1.0 (`topk_tail` only) read unchanged. 1.2 added `policy.router` (the router file of
`--policy sar`). 1.3 added `policy.weighting` (native or published weighting of the selected
experts; absent in older stores).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moekd.schemas.base import Strict
from moekd.schemas.router import RouterFileRef

SCHEMA_VERSION = "1.3"
FORMAT = "moekd-teacher-cache"
ALIGNMENT_DESCRIPTION = (
    "target_positions[p] = t means the stored distribution at p was produced by the teacher at token "
    "position t of its example and predicts input_ids[t + 1]; only positions whose next token is a "
    "response token are stored."
)


class TeacherInfo(Strict):
    name_or_path: str
    architecture: str = Field(description="Model class, e.g. MixtralForCausalLM")
    model_type: str
    revision: str | None = Field(None, description="Hub commit, when loaded from a hub id")
    weights_sha256: str | None = Field(None, description="sha256 over the checkpoint's weight files, sorted by name")
    vocab_size: int = Field(gt=0, description="Size of the teacher's output layer; stored ids are below it")
    dtype: str = Field(description="Dtype the teacher ran in")
    moe_layers: list[str] = Field(description="Module names of the routers, in depth order; empty for a dense teacher")
    router_class: str | None = None
    num_experts: int | None = None
    experts_per_token: int | None = None


class TokenizerInfo(Strict):
    name_or_path: str
    size: int = Field(gt=0, description="len(tokenizer)")
    vocab_sha256: str = Field(description="sha256 of the token-to-id mapping")
    sha256: str = Field(description="sha256 of the whole tokenizer: mapping, rules and special tokens")
    eos_token_id: int
    pad_token_id: int | None = None
    bos_token_id: int | None = None


class PolicyInfo(Strict):
    name: str = Field(description="Routing policy the teacher ran under, e.g. topk, all, ka")
    samples: int = Field(ge=1, description="M: teacher passes per example, each stored separately")
    stochastic: bool
    params: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    seed: int
    seed_derivation: str = Field(description="How the seed of each (example, sample) is derived from `seed`")
    router: RouterFileRef | None = Field(None, description="--policy sar: the trained router file the teacher ran with")
    weighting: str | None = Field(
        None,
        description="(1.3) How the selected experts were weighted: native (the family's own weighting; `topk` "
        "without rewrite is always native) or published (softmax over the kept experts' logits, the others at "
        "-inf: routers whose native weighting is no known computation); 'native / published' when layers differ. "
        "Absent in stores before 1.3",
    )


class TopkEncoding(Strict):
    kind: Literal["topk_tail"] = "topk_tail"
    k: int = Field(gt=0, description="Teacher token ids stored per position and sample")
    logprob_codec: Literal["u16_gap_delta", "u16_steps_sorted_ids"] = Field(
        "u16_gap_delta",
        description="u16_steps_sorted_ids (1.1): ids ascending and delta-coded, log-probs and tail as "
        "uint16 steps below 0 (65535: -inf); u16_gap_delta (1.0): ids in rank order, "
        "float32 top-1, uint16 gaps below it delta-coded along k, float32 tail",
    )
    scale: float = Field(gt=0, description="Quantisation steps per nat of the stored log-probs")
    max_abs_error_nats: float = Field(description="Largest decoding error of a stored log-prob within max_gap_nats")
    max_gap_nats: float = Field(
        description="Log-probs further than this below their reference (0, or the top-1 for "
        "u16_gap_delta) are clamped there"
    )
    normalisation: str
    tail: str


class SampledEncoding(Strict):
    kind: Literal["sampled"] = "sampled"
    draws: int = Field(ge=1, le=65535, description="n: token ids drawn with replacement per position and sample")
    proposal_temp: float = Field(
        gt=0, description="t: the draws come from r = p^t / Z_t, p the teacher at temperature 1"
    )
    width: int = Field(
        gt=0, description="Slots per position and sample: min(draws, vocabulary); unused slots are padding"
    )
    importance_weights: bool = Field(
        description="True when t != 1: sampled_logprobs (log p of each id) and proposal_logz "
        "(log Z_t) are stored for the weights p/r"
    )
    draw_derivation: str
    estimate: str


class HiddenEncoding(Strict):
    kind: Literal["hidden"] = "hidden"
    hidden_dtype: Literal["bf16", "fp8", "fp32"] = Field(
        description="bf16: uint16 bit patterns; fp8: uint8 bit patterns of float8 e4m3fn, each row divided by "
        "hidden_scale; fp32: float32"
    )
    hidden_size: int = Field(gt=0, description="d: width of the teacher's final hidden state")
    output_layer_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        description="Dtype of the stored output layer and of the logits computed from it (bfloat16 as uint16 bits)"
    )
    output_layer_sha256: str = Field(description="sha256 of the output_layer array's bytes (C order, as stored)")
    definition: str


EncodingInfo = Annotated[TopkEncoding | SampledEncoding | HiddenEncoding, Field(discriminator="kind")]


class AlignmentInfo(Strict):
    convention: Literal["next_token"] = "next_token"
    description: str = ALIGNMENT_DESCRIPTION


class DatasetInfo(Strict):
    source: str
    format: str
    fingerprint_sha256: str = Field(description="sha256 of the records' content after field mapping")
    fields: dict[str, str | None]
    template: Literal["dolly", "chat"]
    max_prompt_len: int
    max_len: int
    rows_read: int
    examples: int
    skipped: dict[str, int] = Field(
        default_factory=dict, description="Rows left out (only with --skip-invalid), by reason"
    )
    truncated_responses: int


class GateInfo(Strict):
    mode: Literal["full", "top"] = Field(description="full: all N experts; top: the R largest with the remaining mass")
    r: int = Field(gt=0, description="Experts stored per layer (N when mode is full)")
    num_experts: int
    layers: list[str] = Field(description="Router module names, in the order of the stored layer axis")
    definition: str = Field(description="What the gate distribution of a router family is")
    arrays: list[str]


class ArraySpec(Strict):
    shape: list[int]
    dtype: str
    dims: list[str]


class LayoutInfo(Strict):
    num_examples: int
    num_tokens: int
    num_positions: int
    num_samples: int
    positions_per_chunk: int
    positions_per_shard: int
    arrays: dict[str, ArraySpec]


class BuildInfo(Strict):
    status: Literal["building", "complete"]
    created_at: str
    completed_at: str | None = None
    wall_seconds: float | None = None
    units: int = Field(description="Independently written and resumable pieces (one per position shard)")
    batch_tokens: int
    device: str
    manifest_sha256: str | None = Field(None, description="sha256 of manifest.json (per-file checksums)")
    versions: dict[str, str]


class CacheMetadata(Strict):
    format: Literal["moekd-teacher-cache"] = FORMAT
    schema_version: str = SCHEMA_VERSION
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    policy: PolicyInfo
    encoding: EncodingInfo
    alignment: AlignmentInfo = AlignmentInfo()
    dataset: DatasetInfo
    layout: LayoutInfo
    build: BuildInfo
    gates: GateInfo | None = Field(None, description="Teacher gate distributions, when stored (--router-probs)")
