"""hidden: the teacher's final hidden states, from which its exact logits follow.

Per stored position and sample the teacher's final (normed) hidden state h [d], the input of its
output layer, and once per store that layer W [V, d]: logits = h @ W.T exactly. zarr 3.1.6 has no
bfloat16 or float8 dtype, so the bits are stored: bf16 as uint16 bit patterns (round to nearest
even), fp8 as uint8 bit patterns of float8 e4m3fn after dividing each row by its scale
max|h| / 448 (stored as float32, `hidden_scale`); fp32 as float32. An element's error is at most
HIDDEN_RELATIVE_ERROR of its value (fp8: or 2^-10 of the row's scale, below e4m3's normal range).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from moekd.encodings.base import PER_SAMPLE, Encoder, Encoding
from moekd.errors import MoekdError
from moekd.schemas.cache import ArraySpec, HiddenEncoding

HIDDEN_DTYPES = ("bf16", "fp8", "fp32")
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Relative rounding error of one element: half a unit in the last place (7 and 3 mantissa bits).
HIDDEN_RELATIVE_ERROR = {"fp32": 0.0, "bf16": 2.0**-8, "fp8": 2.0**-4}
HIDDEN_STORED_DTYPE = {"fp32": "float32", "bf16": "uint16", "fp8": "uint8"}

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


def encode_hidden(hidden: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """Stored bits of hidden states [..., d] (any float dtype): `hidden_states`, plus `hidden_scale` for fp8."""
    if dtype == "fp32":
        return {"hidden_states": hidden.float().cpu().numpy()}
    if dtype == "bf16":
        bits = hidden.to(torch.bfloat16).view(torch.int16)
        return {"hidden_states": bits.cpu().numpy().view(np.uint16)}
    h = hidden.float()
    scale = h.abs().amax(dim=-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    bits = (h / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)
    return {"hidden_states": bits.cpu().numpy(), "hidden_scale": scale.cpu().numpy()}


def decode_hidden(bits: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """float32 hidden states [..., d] from `encode_hidden` output."""
    if dtype == "fp32":
        return torch.from_numpy(np.ascontiguousarray(bits))
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()
    values = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn).float()
    return values * torch.from_numpy(np.asarray(scale, dtype=np.float32)).unsqueeze(-1)


def tensor_bits(weight: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array zarr can store: bfloat16 as its uint16 bit patterns."""
    weight = weight.detach().cpu().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy().view(np.uint16)
    return weight.numpy()


def tensor_from_bits(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `tensor_bits` for a tensor of torch dtype name `dtype` (float32, float16, bfloat16)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))


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


class Hidden(Encoding):
    name, kind = "hidden", "hidden"
    flags = {"--hidden-dtype": "hidden_dtype"}

    def check_flags(self, values: dict) -> dict:
        hidden_dtype = "bf16" if values.get("hidden_dtype") is None else values["hidden_dtype"]
        if hidden_dtype not in HIDDEN_DTYPES:
            raise MoekdError(f"--hidden-dtype must be bf16, fp8 or fp32, got {hidden_dtype!r}")
        return {"hidden_dtype": hidden_dtype}

    def encoder(self, flags: dict, model, vocab_size: int) -> Encoder:
        return HiddenEncoder(model, flags["hidden_dtype"])

    def array_specs(self, info, num_positions: int, samples: int, vocab_size: int) -> dict[str, ArraySpec]:
        P, M, d = num_positions, samples, info.hidden_size
        stored = HIDDEN_STORED_DTYPE[info.hidden_dtype]
        specs = {"hidden_states": ArraySpec(shape=[P, M, d], dtype=stored, dims=[*PER_SAMPLE, "hidden"])}
        if info.hidden_dtype == "fp8":
            specs["hidden_scale"] = ArraySpec(shape=[P, M], dtype="float32", dims=PER_SAMPLE)
        layer_dtype = {"bfloat16": "uint16"}.get(info.output_layer_dtype, info.output_layer_dtype)
        specs["output_layer"] = ArraySpec(shape=[vocab_size, d], dtype=layer_dtype, dims=["vocab", "hidden"])
        return specs

    def decode(self, info, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "hidden_states": decode_hidden(raw["hidden_states"], info.hidden_dtype, raw.get("hidden_scale")).numpy()
        }

    def value_problems(self, info, raw: dict, decoded: dict, vocab: int) -> list[str]:
        problems = []
        if info.hidden_dtype == "fp8":
            scale = raw["hidden_scale"]
            if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                problems.append("hidden_scale not finite and > 0")
        if not np.all(np.isfinite(decoded["hidden_states"])):
            problems.append("hidden_states not finite")
        return problems

    def fixed_problems(self, group, info) -> list[str]:
        """The stored output layer is the one the metadata names (sha256) and finite; read chunk by chunk."""
        layer = group["output_layer"]
        rows = layer.chunks[0]
        h = hashlib.sha256()
        finite = True
        for start in range(0, layer.shape[0], rows):
            block = layer[start : start + rows]
            h.update(np.ascontiguousarray(block).tobytes())
            finite = finite and bool(torch.isfinite(tensor_from_bits(block, info.output_layer_dtype)).all())
        problems = []
        if h.hexdigest() != info.output_layer_sha256:
            problems.append("output_layer: sha256 differs from the one recorded in the metadata")
        if not finite:
            problems.append("output_layer: values not finite")
        return problems

    def describe(self, info) -> str:
        return (
            f"hidden: {info.hidden_dtype} hidden states (d = {info.hidden_size}) + output layer "
            f"({info.output_layer_dtype}, sha256 {info.output_layer_sha256[:12]})"
        )


HIDDEN = Hidden()
