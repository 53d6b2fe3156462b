"""Turning the teacher's output at the stored positions into the arrays of the store's encoding.

One encoder per `cache build --encoding` (the arrays and their codecs: moekd/encoding.py):
- `TopkEncoder`: the k largest log-probs, their ids and the exact tail mass;
- `SampledEncoder`: n draws from r = p^t / Z_t, as unique ids and counts (random-sampling KD);
- `HiddenEncoder`: the input of the teacher's output layer, and that layer once per store.
`encode` takes the logits [N, V] of one teacher sample at N stored positions, with the seed of
each position's (example, sample), its position inside the example and the batch's target mask
[B, T] (for a model that computed logits everywhere), and returns per-row arrays [N, ...] in the
store's dtypes. Nothing depends on how positions are batched.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from moekd.cache_builder.policies import token_uniforms
from moekd.encoding import MAX_STEPS, TOPK_SCALE, encode_hidden, encode_topk, tensor_bits
from moekd.errors import MoekdError
from moekd.schemas.cache import HiddenEncoding, SampledEncoding, TopkEncoding
from moekd.store.layout import count_dtype

LOGSOFTMAX_ROWS = 1024  # positions per fp32 log-softmax, to bound memory at large vocabularies
SAMPLING_ROWS = 128  # positions per float64 cumulative distribution
DRAW_STREAM = -1  # the `layer` argument of token_uniforms for token draws; routing draws use layers 0..L-1
DRAW_DERIVATION = (
    "draw j at (example, sample, position t) inverts the cumulative distribution of r = p^t / Z_t (float64, token-id "
    "order) at u * r_total, u = the routing uniform of (row seed of (example, sample), layer -1, position t, slot j); "
    "ids kept unique and ascending with their counts, padding slots id 0 count 0"
)
# Config fields by which transformers families change the logits after the output layer.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "soft-caps its logits (Gemma 2/3/4, VaultGemma, nanochat style)",
    "logit_softcapping": "soft-caps its logits",
    "logit_scale": "multiplies its logits by logit_scale (Cohere, Cohere2, Cohere2-MoE style)",
    "logits_scaling": "divides its logits by logits_scaling (Granite, GraniteMoE style)",
}
LINEAR_FAMILIES = (
    "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss, Llama, Mistral, Qwen2/3 (tied or untied heads)"
)


@torch.no_grad()
def sparse_next_token(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs (normalised over the full vocabulary) and the log tail mass of rows [P, V]."""
    ids, logprobs, tails = [], [], []
    for chunk in logits.split(LOGSOFTMAX_ROWS):
        full = torch.log_softmax(chunk.float(), dim=-1)
        top_lp, top_id = full.topk(k, dim=-1, sorted=True)
        full.scatter_(-1, top_id, float("-inf"))  # what is left is the tail
        ids.append(top_id)
        logprobs.append(top_lp)
        tails.append(torch.logsumexp(full, dim=-1))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)


@torch.no_grad()
def draw_tokens(
    logprobs: torch.Tensor, uniforms: torch.Tensor, proposal_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids [N, n] (ascending, left-packed, padding 0) and counts [N, n] of n draws per row with
    replacement from r = softmax(t * logprobs), by inverting r's float64 CDF at uniforms [N, n] in (0, 1)."""
    log_r = torch.log_softmax(proposal_temp * logprobs.double(), dim=-1)
    cdf = log_r.exp().cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, uniforms.to(cdf.device) * cdf[:, -1:], right=True)
    drawn = drawn.clamp(max=logprobs.shape[-1] - 1).sort(dim=-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = first.long().cumsum(dim=-1) - 1
    ids = torch.zeros_like(drawn).scatter_(-1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add_(-1, slot, torch.ones_like(drawn))
    return ids, counts


class Encoder:
    """What every encoder has: `info` (its metadata) and `encode`."""

    def fixed_arrays(self) -> dict[str, np.ndarray]:
        """Arrays written once per store, before any unit."""
        return {}

    def capturing(self):
        """Context in which the teacher's forwards run."""
        return nullcontext()


class TopkEncoder(Encoder):
    def __init__(self, k: int, scale: float = TOPK_SCALE):
        self.k, self.scale = k, scale
        self.info = TopkEncoding(
            k=k,
            logprob_codec="u16_steps_sorted_ids",
            scale=scale,
            max_abs_error_nats=0.5 / scale,
            max_gap_nats=(MAX_STEPS - 1) / scale,
            normalisation="log_softmax over the teacher's full output vocabulary at temperature 1, in float32",
            tail="tail = log of the probability mass outside the top-k (exact, from the full distribution)",
        )

    def encode(
        self, logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, targets=None
    ) -> dict[str, np.ndarray]:
        ids, logprobs, tail = sparse_next_token(logits, self.k)
        return encode_topk(ids.cpu().numpy(), logprobs.cpu().numpy(), tail.cpu().numpy(), self.scale)


class SampledEncoder(Encoder):
    def __init__(self, draws: int, proposal_temp: float, vocab_size: int):
        self.draws, self.proposal_temp = draws, proposal_temp
        self.width = min(draws, vocab_size)
        importance = proposal_temp != 1.0
        self.info = SampledEncoding(
            draws=draws,
            proposal_temp=proposal_temp,
            width=self.width,
            importance_weights=importance,
            draw_derivation=DRAW_DERIVATION,
            estimate=(
                "p_hat_i = c_i / n estimates the teacher at temperature 1/t; at temperature 1 it is "
                "c_i / n * exp((1 - t) * sampled_logprobs_i + proposal_logz) (unbiased: E[p_hat] = p)"
            ),
        )

    def encode(
        self, logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, targets=None
    ) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"sampled_ids": [], "sampled_counts": [], "sampled_logprobs": [], "proposal_logz": []}
        for rows in torch.arange(len(logits)).split(SAMPLING_ROWS):
            logprobs = torch.log_softmax(logits[rows.to(logits.device)].float(), dim=-1)
            uniforms = token_uniforms(seeds[rows], DRAW_STREAM, positions[rows, None], self.draws)
            ids, counts = draw_tokens(logprobs, uniforms, self.proposal_temp)
            ids, counts = ids[:, : self.width], counts[:, : self.width]
            out["sampled_ids"].append(ids.cpu().numpy().astype(np.int32))
            out["sampled_counts"].append(counts.cpu().numpy().astype(count_dtype(self.draws)))
            if self.info.importance_weights:
                stored = logprobs.gather(-1, ids).masked_fill(counts == 0, 0.0)
                out["sampled_logprobs"].append(stored.cpu().numpy())
                logz = torch.logsumexp(self.proposal_temp * logprobs.double(), dim=-1)
                out["proposal_logz"].append(logz.float().cpu().numpy())
        return {name: np.concatenate(parts) for name, parts in out.items() if parts}


class HiddenEncoder(Encoder):
    """The teacher's final (normed) hidden state at each stored position: the input of its output layer,
    captured by a forward hook, checked to give the model's logits exactly."""

    def __init__(self, model, hidden_dtype: str):
        head = output_layer(model)
        self.head, self.hidden_dtype = head, hidden_dtype
        self.weight_bits = tensor_bits(head.weight)
        self.info = HiddenEncoding(
            hidden_dtype=hidden_dtype,
            hidden_size=head.weight.shape[1],
            output_layer_dtype=str(head.weight.dtype).removeprefix("torch."),
            output_layer_sha256=hashlib.sha256(self.weight_bits.tobytes()).hexdigest(),
            definition=(
                "logits = hidden_states @ output_layer.T, computed in output_layer_dtype: exactly the teacher's "
                "logits at temperature 1 when hidden_dtype holds the teacher's states without rounding (bf16 for a "
                "bfloat16 teacher, fp32 for a float32 one); bf16 rounds a float32 teacher's to 8 significant "
                "bits, fp8 to 4"
            ),
        )
        self._captured: tuple[torch.Tensor, torch.Tensor] | None = None

    def fixed_arrays(self) -> dict[str, np.ndarray]:
        return {"output_layer": self.weight_bits}

    @contextmanager
    def capturing(self):
        handle = self.head.register_forward_hook(self._capture)
        try:
            yield
        finally:
            handle.remove()
            self._captured = None

    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured = (args[0], output)

    def encode(
        self, logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, targets=None
    ) -> dict[str, np.ndarray]:
        hidden, head_out = self._captured
        if hidden.dim() == 3:  # the model computed logits everywhere: keep the stored positions
            hidden, head_out = hidden[targets], head_out[targets]
        if not torch.equal(head_out.to(logits.dtype), logits):
            raise MoekdError(
                "--encoding hidden: the teacher changes its logits after the output layer, so they are "
                f"not hidden @ W.T; use --encoding topk or sampled (linear heads: {LINEAR_FAMILIES})"
            )
        return encode_hidden(hidden, self.hidden_dtype)


def output_layer(model) -> nn.Linear:
    """The teacher's output layer, refused for the hidden encoding unless logits = h @ W.T exactly."""
    head = model.get_output_embeddings()
    why = None
    if type(head) is not nn.Linear:
        why = f"its output layer is a {type(head).__name__}, not a plain torch.nn.Linear"
    elif head.bias is not None:
        why = "its output layer has a bias (Phi-style heads)"
    else:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            for field, what in LOGIT_TRANSFORMS.items():
                value = getattr(config, field, None)
                if value is not None and value != 1:
                    why = f"it {what} ({field} = {value})"
    if why:
        raise MoekdError(
            f"--encoding hidden: teacher {type(model).__name__} does not qualify: {why}; logits must be "
            f"hidden @ W.T exactly (qualify: {LINEAR_FAMILIES}); use --encoding topk or sampled"
        )
    return head


ENCODING_FLAGS = {
    "topk": ("--k", "--logprob-scale"),
    "sampled": ("--draws", "--proposal-temp"),
    "hidden": ("--hidden-dtype",),
}


def encoding_flags(
    encoding: str,
    k: int | None,
    draws: int | None,
    proposal_temp: float | None,
    hidden_dtype: str | None,
    logprob_scale: float | None = None,
) -> dict:
    """The checked flags of `--encoding`, defaults filled in; flags of another encoding are refused."""
    if encoding not in ENCODING_FLAGS:
        raise MoekdError(f"--encoding: {encoding!r} is not topk, sampled or hidden")
    given = {
        "--k": k,
        "--logprob-scale": logprob_scale,
        "--draws": draws,
        "--proposal-temp": proposal_temp,
        "--hidden-dtype": hidden_dtype,
    }
    for flag, value in given.items():
        if value is not None and flag not in ENCODING_FLAGS[encoding]:
            owner = next(name for name, flags in ENCODING_FLAGS.items() if flag in flags)
            raise MoekdError(f"{flag} applies only to --encoding {owner}, not --encoding {encoding}; drop it")
    if encoding == "topk":
        k = 64 if k is None else k
        scale = TOPK_SCALE if logprob_scale is None else float(logprob_scale)
        if k < 1:
            raise MoekdError(f"--k must be at least 1, got {k}")
        if not (np.isfinite(scale) and 1 <= scale <= 4096):
            raise MoekdError(f"--logprob-scale must be in [1, 4096] steps per nat, got {scale}")
        return {"k": k, "logprob_scale": scale}
    if encoding == "sampled":
        draws = 32 if draws is None else draws
        proposal_temp = 1.0 if proposal_temp is None else float(proposal_temp)
        if not 1 <= draws <= 65535:
            raise MoekdError(f"--draws must be in [1, 65535], got {draws}")
        if not (np.isfinite(proposal_temp) and proposal_temp > 0):
            raise MoekdError(f"--proposal-temp must be a finite number > 0, got {proposal_temp}")
        return {"draws": draws, "proposal_temp": proposal_temp}
    hidden_dtype = "bf16" if hidden_dtype is None else hidden_dtype
    if hidden_dtype not in ("bf16", "fp8", "fp32"):
        raise MoekdError(f"--hidden-dtype must be bf16, fp8 or fp32, got {hidden_dtype!r}")
    return {"hidden_dtype": hidden_dtype}


def make_encoder(encoding: str, flags: dict, model, vocab_size: int) -> Encoder:
    """The encoder of `--encoding` with the flags `encoding_flags` returned, for this teacher."""
    if encoding == "topk":
        if flags["k"] > vocab_size:
            raise MoekdError(f"--k {flags['k']} exceeds the teacher's vocabulary of {vocab_size}")
        return TopkEncoder(flags["k"], flags["logprob_scale"])
    if encoding == "sampled":
        return SampledEncoder(flags["draws"], flags["proposal_temp"], vocab_size)
    return HiddenEncoder(model, flags["hidden_dtype"])
