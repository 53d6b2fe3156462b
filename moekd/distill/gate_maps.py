"""Cached teacher gate distributions as targets for an MoE student's routers (Balanced Distillation).

The store holds, per stored position and teacher sample, the gate distribution of every
teacher MoE layer (`cache build --router-probs`, `meta.gates`). `GateTargets` turns those
arrays into one target distribution per position, sample and mapped student layer, over the
student's experts:
1. layers: student MoE layer s takes teacher MoE layer `layer_map[s]`. Layers are counted over
   the MoE layers (routers) of each model, in depth order. `auto`: round(s·(L_T-1)/(L_S-1)),
   rounding halves up (a one-layer student takes the teacher's last layer); an explicit map
   "0:0,1:2" lists student:teacher pairs, and student layers left out get no router loss.
2. dense: a `full` store holds all N_T probabilities; a `top-R` store holds the R largest and
   the rest mass, which is spread evenly over the other N_T - R experts. float16 storage is
   renormalised to sum 1.
3. experts: `group` sums contiguous groups of teacher experts (student expert j takes teacher
   experts floor(j·N_T/N_S) .. floor((j+1)·N_T/N_S) - 1: an exact distribution, also when N_S
   does not divide N_T); `stride` keeps the first teacher expert of each such group (every
   (N_T/N_S)-th) and renormalises, as the published code does. A stride target whose kept
   experts carry no mass at all is uniform.
4. Monte-Carlo uniforms: K per position, sample and mapped layer, drawn per example from
   (seed, epoch, example) (held-out batches use epoch 0; their examples are never trained on).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from moekd.encodings.gates import dense_gates
from moekd.errors import MoekdError

EXPERT_MAPS = ("group", "stride")
MC_STREAM = 1  # the fourth word of the Monte-Carlo draws' seed


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs spreading the student's layers evenly over the teacher's depth."""
    if student_layers == 1:
        return [(0, teacher_layers - 1)]
    return [(s, math.floor(s * (teacher_layers - 1) / (student_layers - 1) + 0.5)) for s in range(student_layers)]


def parse_layer_map(spec: str, student_names: list[str], teacher_names: list[str]) -> list[tuple[int, int]]:
    """The (student, teacher) MoE-layer pairs of `--layer-map` (auto or "s:t,s:t,..."), sorted by student layer."""
    if spec == "auto":
        return uniform_layer_map(len(student_names), len(teacher_names))
    if not re.fullmatch(r"\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*", spec):
        raise MoekdError(f'--layer-map: {spec!r} is neither auto nor student:teacher pairs such as "0:0,1:2"')
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in spec.split(",")]
    seen = set()
    for s, t in pairs:
        if s >= len(student_names):
            raise MoekdError(
                f"--layer-map: student MoE layer {s} does not exist; the student has {len(student_names)} "
                f"MoE layers (0..{len(student_names) - 1})"
            )
        if t >= len(teacher_names):
            raise MoekdError(
                f"--layer-map: teacher MoE layer {t} (for student layer {s}) is not in the cache, which stores "
                f"{len(teacher_names)} teacher layers (0..{len(teacher_names) - 1})"
            )
        if s in seen:
            raise MoekdError(f"--layer-map: student MoE layer {s} ({student_names[s]}) is mapped twice")
        seen.add(s)
    return sorted(pairs)


def expert_map(kind: str, teacher_experts: int, student_experts: int) -> torch.Tensor:
    """[N_T, N_S] float32 matrix M: a teacher distribution p becomes p @ M (then renormalised)."""
    if kind not in EXPERT_MAPS:
        raise MoekdError(f"--expert-map must be one of {', '.join(EXPERT_MAPS)}, got {kind!r}")
    if student_experts > teacher_experts:
        raise MoekdError(
            f"--expert-map {kind}: the student has {student_experts} experts per layer, more than the teacher's "
            f"{teacher_experts}; student expert {teacher_experts} would get no teacher expert. Use a student with at most "
            f"{teacher_experts} experts"
        )
    starts = np.floor(np.arange(student_experts + 1) * teacher_experts / student_experts).astype(int)
    matrix = torch.zeros(teacher_experts, student_experts)
    for j in range(student_experts):
        matrix[starts[j] : starts[j + 1] if kind == "group" else starts[j] + 1, j] = 1.0
    return matrix


class GateTargets:
    """What the loader adds to a batch for Balanced Distillation (see the module docstring):
    teacher_gates, float32 [P, M, len(pairs), N_S] from stored gate arrays [P, M, L_T, ...], and
    mc_uniforms, float32 [K, P, M, len(pairs)] in (0, 1] for the Monte-Carlo draws."""

    def __init__(self, pairs: list[tuple[int, int]], teacher_experts: int, matrix: torch.Tensor, draws: int, seed: int):
        self.pairs, self.teacher_experts, self.matrix = pairs, teacher_experts, matrix
        self.teacher_layers = np.array([t for _, t in pairs])
        self.draws, self.seed = draws, seed

    def __call__(self, arrays: dict[str, np.ndarray], examples: list[int], positions: np.ndarray, epoch: int) -> dict:
        wide = {"gate_ids": np.int64}  # torch has few uint16 ops
        chosen = {
            name: torch.from_numpy(a.take(self.teacher_layers, axis=2).astype(wide.get(name, np.float32)))
            for name, a in arrays.items()
        }
        mapped = dense_gates(chosen, self.teacher_experts) @ self.matrix
        total = mapped.sum(-1, keepdim=True)
        uniform = torch.full_like(mapped, 1.0 / mapped.shape[-1])
        gates = torch.where(total > 0, mapped / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)
        return {"teacher_gates": gates, "mc_uniforms": self.uniforms(examples, positions, epoch, gates.shape[1])}

    def uniforms(self, examples: list[int], positions: np.ndarray, epoch: int, samples: int) -> torch.Tensor:
        """[K, P, M, L] uniforms drawn per example from (seed, epoch, example): the same whatever the batch
        (resume, held-out evaluation, any number of ranks). The stream differs from --samples random's."""
        shape = (self.draws, samples, len(self.pairs))
        parts = [
            np.random.default_rng([self.seed, epoch, e, MC_STREAM]).random((n, *shape), dtype=np.float32)
            for e, n in zip(examples, positions)
        ]
        return torch.from_numpy(1.0 - np.concatenate(parts)).permute(1, 0, 2, 3).contiguous()
