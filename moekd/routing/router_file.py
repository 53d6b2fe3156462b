"""The Student-Aware Router file: the trained router parameters of a teacher, as safetensors.

The file holds one float32 tensor per trainable router parameter, named as in the teacher
(`model.layers.0.mlp.gate.weight` ...), so `model.load_state_dict(tensors, strict=False)` would
load it too; its header metadata (`RouterFileMeta`, key `moekd`) names the teacher (weights
sha256, router class, layer names), the student, the steps, settings and losses. It is written
atomically (a temporary file renamed into place), so a file that exists is complete.

Trainable router parameters are the ones each router's gate distribution depends on
(`moekd.routing.routers.gate_parameters`, found by autograd when the routers are recognised): the gate
weights of every MoE layer, on every family whose routers moekd recognises. The router's other
tensors (`frozen_router_tensors`: DeepSeek-V3-style correction biases that only steer the
native top-k choice, per-expert output scales) are never trained nor stored.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from moekd.errors import MoekdError
from moekd.fsio import sha256_file
from moekd.routing.routers import RouterInfo, find_routers, gate_parameters, recognise_routers
from moekd.schemas.router import ROUTER_FORMAT, RouterFileMeta, RouterFileRef, RouterTeacher

METADATA_KEY = "moekd"


def recognised_routers(model: nn.Module, flag: str = "--teacher") -> list[RouterInfo]:
    """Every router of `model` in forward order, recognised by one short forward (moekd/routing/routers.py);
    a one-line error for a dense model, a router no known computation fits, or one with nothing to train."""
    infos = recognise_routers(model)
    if not infos:
        raise MoekdError(
            f"{flag}: {type(model).__name__} is dense (no MoE routers); SAR trains the routers of an MoE teacher"
        )
    for info in infos:
        if info.adapter is None:
            raise MoekdError(
                f"{flag}: router class {type(info.module).__name__} is not supported by SAR: {info.reason}"
            )
        if not info.gate_parameter_names:
            raise MoekdError(
                f"{flag}: router {info.name} ({type(info.module).__name__}): its gate distribution depends "
                "on no parameter, so SAR has nothing to train"
            )
    return infos


def router_gate_parameters(infos: list[RouterInfo]) -> dict[str, nn.Parameter]:
    """The trainable parameters of these routers (`gate_parameters`), by full parameter name, in forward order."""
    return {f"{info.name}.{local}": param for info in infos for local, param in gate_parameters(info.module)}


def describe_teacher(
    model: nn.Module, infos: list[RouterInfo], teacher: str, weights_sha256: str | None
) -> RouterTeacher:
    """The teacher as a router file names it; `weights_sha256` is `checkpoint_sha256(teacher)`."""
    sizes = {(info.adapter.num_experts, info.adapter.top_k) for info in infos}
    num_experts, top_k = min(sizes)  # as RouterController reports them
    return RouterTeacher(
        name_or_path=str(teacher),
        weights_sha256=weights_sha256,
        architecture=type(model).__name__,
        router_class=", ".join(sorted({type(info.module).__name__ for info in infos})),
        moe_layers=[info.name for info in infos],
        num_experts=num_experts,
        experts_per_token=top_k,
    )


def write_router_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: RouterFileMeta) -> None:
    """Write the router tensors (as float32) and their metadata atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
        str(partial),
        metadata={METADATA_KEY: meta.model_dump_json()},
    )
    with open(partial, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, path)


def read_router_file(path: str | Path, flag: str = "--router") -> tuple[dict[str, torch.Tensor], RouterFileMeta]:
    """Tensors and validated metadata of a router file; a one-line error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"{flag} {path}: no such file; pass the router file `moekd sar train --out` wrote")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as e:
        raise MoekdError(
            f"{flag} {path}: not a readable safetensors file, truncated or damaged ({e}); "
            "copy it again or rerun `moekd sar train`"
        ) from None
    if METADATA_KEY not in header:
        raise MoekdError(
            f"{flag} {path}: a safetensors file without moekd metadata, not a router file of `moekd sar train`"
        )
    try:
        raw = json.loads(header[METADATA_KEY])
        if raw.get("format") != ROUTER_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        meta = RouterFileMeta.model_validate(raw)
    except (ValueError, ValidationError) as e:
        raise MoekdError(
            f"{flag} {path}: its moekd metadata is not that of a SAR router file ({str(e).splitlines()[0]})"
        ) from None
    stored = {name: list(t.shape) for name, t in tensors.items()}
    if stored != meta.parameters:
        raise MoekdError(
            f"{flag} {path}: its tensors do not match its own metadata (damaged file); rerun `moekd sar train`"
        )
    return tensors, meta


def check_router_file(
    meta: RouterFileMeta,
    model: nn.Module,
    teacher: str,
    weights_sha256: str | None,
    path: str | Path,
    flag: str = "--router",
) -> dict[str, nn.Parameter]:
    """Refuse a router file trained for another teacher, naming what differs; the teacher's router
    parameters the file's tensors go to, by name."""
    where = f"{flag} {path}"
    if not find_routers(model):
        raise MoekdError(f"{where}: the teacher {teacher} is dense (no MoE routers) and cannot take a router file")
    infos = recognised_routers(model, "--teacher")
    ours, theirs = describe_teacher(model, infos, teacher, weights_sha256), meta.teacher
    if ours.weights_sha256 != theirs.weights_sha256 or (
        ours.weights_sha256 is None and ours.name_or_path != theirs.name_or_path
    ):
        raise MoekdError(
            f"{where} was trained for another teacher: {theirs.name_or_path} (weights sha256 {str(theirs.weights_sha256)[:12]}), "
            f"not {teacher} (weights sha256 {str(ours.weights_sha256)[:12]}); use the router file trained for this teacher"
        )
    if ours.moe_layers != theirs.moe_layers:
        raise MoekdError(f"{where}: its router layers {theirs.moe_layers} are not the teacher's {ours.moe_layers}")
    params = router_gate_parameters(infos)
    shapes = {name: list(p.shape) for name, p in params.items()}
    for name in sorted(set(shapes) | set(meta.parameters)):
        if name not in meta.parameters:
            raise MoekdError(f"{where}: the teacher's router parameter {name} is missing from the file")
        if name not in shapes:
            raise MoekdError(f"{where}: the file holds {name}, which is not a router parameter of the teacher")
        if shapes[name] != meta.parameters[name]:
            raise MoekdError(
                f"{where}: {name} has shape {meta.parameters[name]} in the file but {shapes[name]} in the teacher"
            )
    return params


def load_router_file(
    model: nn.Module, path: str | Path, teacher: str, weights_sha256: str | None, flag: str = "--router"
) -> RouterFileRef:
    """Check a router file against the teacher (checkpoint `teacher`, `checkpoint_sha256` = weights_sha256)
    and copy its weights into the teacher's routers, in the parameters' dtype (a bfloat16 teacher
    rounds them to bfloat16)."""
    tensors, meta = read_router_file(path, flag)
    params = check_router_file(meta, model, teacher, weights_sha256, path, flag)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.dtype))
    return RouterFileRef(path=str(path), sha256=sha256_file(path), meta=meta)


@contextmanager
def swapped_routers(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]):
    """Router parameters `params` (by name) hold `tensors` inside the block, their own values again after it."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
