"""sampled: random-sampling KD, n teacher token ids drawn per position and sample.

n draws with replacement from the proposal r = p^t / Z_t, kept as the unique ids (ascending) and
their counts c_i (padding: id 0, count 0): `sampled_ids` and `sampled_counts` [P, M, S]. The
estimate p_hat_i = (c_i / n) * p_i / r_i is unbiased for p (E[p_hat] = p); with t = 1 it is c_i / n
and needs nothing else, with t != 1 the store also keeps log p_i (`sampled_logprobs`) and log Z_t
(`proposal_logz`). See `sampled_estimate`.
"""

from __future__ import annotations

import numpy as np
import torch

from moekd.encodings.base import PER_SAMPLE, Encoder, Encoding, SparseDistribution
from moekd.errors import MoekdError
from moekd.schemas.cache import ArraySpec, SampledEncoding
from moekd.seeds import token_uniforms

DEFAULT_DRAWS = 32
SAMPLING_ROWS = 128  # positions per float64 cumulative distribution
DRAW_STREAM = -1  # the `layer` argument of token_uniforms for token draws; routing draws use layers 0..L-1
DRAW_DERIVATION = (
    "draw j at (example, sample, position t) inverts the cumulative distribution of r = p^t / Z_t (float64, token-id "
    "order) at u * r_total, u = the routing uniform of (row seed of (example, sample), layer -1, position t, slot j); "
    "ids kept unique and ascending with their counts, padding slots id 0 count 0"
)


def count_dtype(draws: int) -> str:
    return "uint8" if draws <= np.iinfo(np.uint8).max else "uint16"


def sampled_estimate(
    counts: torch.Tensor,
    draws: int,
    proposal_temp: float,
    logprobs: torch.Tensor | None = None,
    proposal_logz: torch.Tensor | None = None,
    target_temp: float = 1.0,
) -> torch.Tensor:
    """Unbiased estimate [..., S] (float32) of the teacher's probabilities of the stored ids.

    counts [..., S] of `draws` draws from r = p^t / Z_t (t = proposal_temp). The target is the
    teacher at temperature `target_temp` (p^(1/T) renormalised). The draws themselves come from
    the teacher at temperature 1/t, so for T = 1/t the estimate is c / n; for T = 1 (t != 1) it is
    importance-weighted, c / n * p / r = c / n * exp((1 - t) log p + log Z_t), which needs the
    stored log-probs and log Z_t. Other temperatures have no unbiased estimate from these draws.
    """
    frequency = counts.double() / draws
    if estimable_temperature(target_temp, proposal_temp) is None:
        raise ValueError(
            f"no unbiased estimate of the teacher at temperature {target_temp} from draws at proposal "
            f"temperature {proposal_temp}: train at temperature 1 or {1 / proposal_temp:g}"
        )
    if abs(target_temp * proposal_temp - 1.0) < 1e-12:
        return frequency.float()
    log_ratio = (1.0 - proposal_temp) * logprobs.double() + proposal_logz.double().unsqueeze(-1)
    return torch.where(counts > 0, frequency * log_ratio.exp(), 0.0).float()


def estimable_temperature(target_temp: float, proposal_temp: float) -> str | None:
    """How draws at proposal temperature t estimate the teacher at temperature T without bias:
    'frequencies' (T = 1/t), 'importance' (T = 1, t != 1), or None (any other T)."""
    if abs(target_temp * proposal_temp - 1.0) < 1e-12:
        return "frequencies"
    return "importance" if target_temp == 1.0 else None


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


class Sampled(Encoding):
    name, kind, id_array = "sampled", "sampled", "sampled_ids"
    flags = {"--draws": "draws", "--proposal-temp": "proposal_temp"}

    def check_flags(self, values: dict) -> dict:
        draws = DEFAULT_DRAWS if values.get("draws") is None else values["draws"]
        proposal_temp = 1.0 if values.get("proposal_temp") is None else float(values["proposal_temp"])
        if not 1 <= draws <= 65535:
            raise MoekdError(f"--draws must be in [1, 65535], got {draws}")
        if not (np.isfinite(proposal_temp) and proposal_temp > 0):
            raise MoekdError(f"--proposal-temp must be a finite number > 0, got {proposal_temp}")
        return {"draws": draws, "proposal_temp": proposal_temp}

    def encoder(self, flags: dict, model, vocab_size: int) -> Encoder:
        return SampledEncoder(flags["draws"], flags["proposal_temp"], vocab_size)

    def array_specs(self, info, num_positions: int, samples: int, vocab_size: int) -> dict[str, ArraySpec]:
        P, M, S = num_positions, samples, info.width
        specs = {
            "sampled_ids": ArraySpec(shape=[P, M, S], dtype="int32", dims=[*PER_SAMPLE, "slot"]),
            "sampled_counts": ArraySpec(shape=[P, M, S], dtype=count_dtype(info.draws), dims=[*PER_SAMPLE, "slot"]),
        }
        if info.importance_weights:
            specs["sampled_logprobs"] = ArraySpec(shape=[P, M, S], dtype="float32", dims=[*PER_SAMPLE, "slot"])
            specs["proposal_logz"] = ArraySpec(shape=[P, M], dtype="float32", dims=PER_SAMPLE)
        return specs

    def decode(self, info, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"sampled_ids": raw["sampled_ids"], "sampled_counts": raw["sampled_counts"].astype(np.int32)}
        if info.importance_weights:
            out.update(sampled_logprobs=raw["sampled_logprobs"], proposal_logz=raw["proposal_logz"])
        return out

    def value_problems(self, info, raw: dict, decoded: dict, vocab: int) -> list[str]:
        ids, counts = decoded["sampled_ids"], decoded["sampled_counts"]
        real = counts > 0
        problems = []
        if np.any(ids < 0) or np.any(ids >= vocab):
            problems.append(f"sampled_ids outside [0, {vocab})")
        if np.any(counts.sum(-1) != info.draws):
            problems.append(f"sampled_counts do not add up to the {info.draws} draws of every position and sample")
        if np.any(real[..., 1:] & ~real[..., :-1]) or np.any(ids[~real] != 0):
            problems.append("padding slots (count 0, id 0) are not all after the drawn ids")
        if np.any((np.diff(ids, axis=-1) <= 0) & real[..., 1:]):
            problems.append("sampled_ids are not unique and ascending")
        if info.importance_weights:
            logprobs, logz = decoded["sampled_logprobs"], decoded["proposal_logz"].astype(np.float64)
            if not np.all(np.isfinite(logprobs)) or np.any(logprobs > 0) or np.any(logprobs[~real] != 0):
                problems.append("sampled_logprobs not finite and <= 0 (0 in padding slots)")
            elif not np.all(np.isfinite(logz)):
                problems.append("proposal_logz not finite")
            else:  # the proposal mass of the drawn ids cannot exceed 1
                mass = np.where(real, np.exp(info.proposal_temp * logprobs - logz[..., None]), 0.0).sum(-1)
                if np.any(mass > 1 + 1e-5):
                    problems.append(f"proposal mass of the drawn ids up to {mass.max():.6f} > 1")
        return problems

    def describe(self, info) -> str:
        weights = ", importance weights stored" if info.importance_weights else ""
        return f"sampled: {info.draws} draws from p^{info.proposal_temp:g}, unique ids + counts{weights}"

    def _estimate(self, info, decoded: dict, temperature: float) -> torch.Tensor:
        stored = {name: torch.from_numpy(value) for name, value in decoded.items()}
        return sampled_estimate(
            stored["sampled_counts"],
            info.draws,
            info.proposal_temp,
            stored.get("sampled_logprobs"),
            stored.get("proposal_logz"),
            temperature,
        )

    def training_targets(self, info, decoded: dict, temperature: float) -> dict:
        """The ids and the unbiased estimate of the teacher (at the training temperature) there."""
        return {
            "sampled_ids": decoded["sampled_ids"],
            "sampled_weights": self._estimate(info, decoded, temperature).numpy(),
        }

    def sparse_distribution(self, info, decoded: dict, temperature: float, location: str) -> SparseDistribution:
        """The unbiased estimate, at T = 1 or T = 1/t for proposal temperature t (other temperatures have none)."""
        if estimable_temperature(temperature, info.proposal_temp) is None:
            raise MoekdError(
                f"cache {location}: draws from p^{info.proposal_temp:g} estimate the teacher without "
                f"bias at temperature 1 or {1 / info.proposal_temp:g} only, not {temperature:g}"
            )
        probs = self._estimate(info, decoded, temperature).numpy()
        return SparseDistribution(decoded["sampled_ids"], probs, None, estimate=True)


SAMPLED = Sampled()
