"""Metadata of a Student-Aware Router file (`moekd sar train --out router.safetensors`).

Stored as JSON under the key `moekd` of the safetensors header's `__metadata__`; a cache built
with `--policy sar` copies it into its own metadata (`policy.router`), with the file's sha256.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moekd.schemas.base import Strict

ROUTER_FORMAT = "moekd-sar-router"
ROUTER_FILE_VERSION = "1.0"

Setting = float | int | str | bool | None


class RouterTeacher(Strict):
    name_or_path: str
    weights_sha256: str | None = Field(
        None, description="sha256 of the teacher checkpoint the routers were trained from (untrained routers)"
    )
    architecture: str
    router_class: str
    moe_layers: list[str] = Field(description="Router module names, in depth order")
    num_experts: int
    experts_per_token: int


class RouterStudent(Strict):
    name_or_path: str
    weights_sha256: str | None = Field(
        None, description="sha256 of the student checkpoint whose feedback trained the routers"
    )
    co_trained: bool = Field(
        description="The student was trained too (--co-train-student) and saved beside the router file"
    )


class RouterFileMeta(Strict):
    format: Literal["moekd-sar-router"] = ROUTER_FORMAT
    version: str = ROUTER_FILE_VERSION
    teacher: RouterTeacher
    parameters: dict[str, list[int]] = Field(description="Stored tensor (teacher parameter name) -> shape; float32")
    student: RouterStudent
    steps: int = Field(ge=0, description="Router updates made")
    settings: dict[str, Setting] = Field(description="The `moekd sar train` settings of the run")
    loss_start: float = Field(description="Teacher loss on the probe batch before the first update")
    loss_end: float = Field(description="Teacher loss on the probe batch after the last update")
    train_seconds: float | None = Field(
        None, description="Wall time of the training steps (the last session, if resumed)"
    )
    created_at: str
    versions: dict[str, str]


class RouterFileRef(Strict):
    """What a `--policy sar` cache records about the router file it was built with."""

    path: str
    sha256: str = Field(description="sha256 of the router file's bytes")
    meta: RouterFileMeta
