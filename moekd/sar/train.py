"""`moekd sar train`: train the teacher's routers with the student's feedback (docs/methods.md §3).

Flow: check the options, the student's tokenizer against the teacher's and the data -> load
the teacher (every parameter frozen but its router gate weights, which are kept in float32 and
get their own AdamW) and the student (frozen unless --co-train-student) -> per step: a batch of
training examples (packed within --batch-tokens, seeded order), the responses (the data's, or
sampled from the student), one router update on the teacher loss of objective.py with the
teacher routing through all experts, and with --co-train-student one student update against
the updated teacher -> metrics every step, a resumable checkpoint every --save-every steps ->
the router file (router_file.py), and the student beside it when co-trained.

The teacher runs in **eval mode**: no dropout and no router jitter (Mixtral's `router_jitter_noise`
multiplies the MoE input by uniform noise in train mode; other families have no gate noise at
all), so every step is deterministic and the routers are trained for the teacher exactly as
`cache build` runs it. The published loop keeps gate noise on; that is the one difference.
With --gradient-checkpointing the teacher's decoder layers recompute their activations in
backward (only the layers' own `training` flag is set, which is what transformers checks;
their sub-modules stay in eval mode). The backward runs while the all-experts routing is
installed, so a replayed layer routes as its forward did.

All randomness is derived from (--seed, step): the batch order, the student's sampled responses
and torch's generator at the start of each step. A resumed run therefore reproduces the
uninterrupted one without restoring any random state.

One run writes an --out at a time: `train_router` holds its lock (moekd/locking.py) from before it
looks for a checkpoint to resume from until the router file is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from moekd import __version__
from moekd.data.batches import response_positions, right_pad
from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.data.tokenizer import tokenizer_differences, tokenizer_fingerprint
from moekd.distill.sources import TokenizedSource
from moekd.errors import MoekdError
from moekd.eval.generate import sample_continuations
from moekd.interrupt import resumable, resume_command
from moekd.locking import WriterLock
from moekd.models import (
    checkpoint_sha256,
    load_causal_lm,
    load_tokenizer,
    output_vocab_size,
    resolve_device,
    resolve_dtype,
)
from moekd.routing.controller import RouterController
from moekd.routing.policies import AllExperts
from moekd.routing.router_file import describe_teacher, recognised_routers, router_gate_parameters, write_router_file
from moekd.sar.objective import RouterRecorder, student_divergence, teacher_loss
from moekd.sar.options import DEFAULT_STUDENT_LR, RUN_ONLY, SarOptions, check_options, run_dir, student_dir
from moekd.schemas.router import RouterFileMeta, RouterStudent
from moekd.training.checkpoint import load_state, resume_point, save_checkpoint, step_dir
from moekd.training.frame import StepFrame, check_finite
from moekd.training.order import BatchOrder, LoaderPosition

__all__ = ["SarOptions", "SarSummary", "RouterTrainer", "train_router"]

COLUMNS = (
    "step",
    "epoch",
    "loss",
    "divergence",
    "importance_cv2",
    "load_cv2",
    "student_loss",
    "lr",
    "grad_norm",
    "student_grad_norm",
    "tokens",
    "tokens_per_s",
)
ROUTER_CHECKPOINT = "router.safetensors"


@dataclass
class SarSummary:
    out: str
    steps: int
    tokens: int
    loss_start: float
    loss_end: float
    resumed_from: str | None
    student_out: str | None
    wall_seconds: float
    tokens_per_second: float


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, W] right-padded prompt + response
    attention: torch.Tensor  # [B, W]
    targets: torch.Tensor  # bool [B, W]: response positions (t predicts token t+1)
    examples: list[int]
    epoch: int
    index: int

    @property
    def tokens(self) -> int:
        return int(self.attention.sum())


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step` (0 = the probe batch): responses and torch's generator."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def pad_sequences(sequences: list[np.ndarray], prompt_lens: list[int], pad_id: int):
    """Right-padded input_ids, attention mask and response-position mask [B, longest]."""
    targets = [response_positions(p, len(seq)) for seq, p in zip(sequences, prompt_lens)]
    return right_pad(sequences, pad_id, targets)


class _Checkpoint:
    """What a step checkpoint holds besides the training state: the router weights, the co-trained student."""

    def __init__(self, routers: dict, student=None, student_tokenizer=None):
        self.routers, self.student, self.student_tokenizer = routers, student, student_tokenizer

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in self.routers.items()},
            str(Path(path) / ROUTER_CHECKPOINT),
        )
        if self.student is not None:
            self.student.save_pretrained(str(Path(path) / "student"))
            self.student_tokenizer.save_pretrained(str(Path(path) / "student"))


class RouterTrainer:
    """One SAR run: set up in the constructor (checks, models, resume point), then `train()`."""

    def __init__(self, o: SarOptions, console: Console | None = None, lock: WriterLock | None = None):
        """`lock`: the run's lock, held by the caller (train_router); checked before each save."""
        self.o, self.console = o, console or Console(stderr=True, quiet=True)
        check_options(o)
        self.lock = lock or WriterLock(o.out, "--out")  # not taken: verify() does nothing
        self.device = resolve_device(o.device)
        self.dtype = resolve_dtype(o.dtype, self.device)
        self.tokenizer = load_tokenizer(o.teacher, "--teacher")
        self.student_tokenizer = load_tokenizer(o.student, "--student")
        self._check_tokenizers()
        loaded = load_records(o.data, o.fields, o.skip_invalid).first(o.max_examples)
        report = tokenize_records(
            loaded.records,
            loaded.source_index,
            self.tokenizer,
            o.max_prompt_len,
            o.max_len,
            o.chat_template,
            o.skip_invalid,
        )
        self.source = TokenizedSource(report.examples)
        self.teacher_sha256, self.student_sha256 = checkpoint_sha256(o.teacher), checkpoint_sha256(o.student)
        self.config = {
            **asdict(o),
            "student_lr": self.student_lr,
            "data_fingerprint": loaded.fingerprint(),
            "teacher_sha256": self.teacher_sha256,
            "student_sha256": self.student_sha256,
            "dtype": str(self.dtype).removeprefix("torch."),
            "moekd_version": __version__,
        }
        self.run = run_dir(o.out)
        self.resume_from = resume_point(self.run, self.config, o.resume, RUN_ONLY)

        self.teacher = load_causal_lm(o.teacher, self.dtype, self.device)
        infos = recognised_routers(self.teacher)  # before the routers turn float32: recognition runs a forward
        self.teacher_info = describe_teacher(self.teacher, infos, o.teacher, self.teacher_sha256)
        self.controller = RouterController(self.teacher, AllExperts())
        self.recorder = RouterRecorder(infos)
        self.routers = self._prepare_teacher(router_gate_parameters(infos))
        student_from = self.resume_from / "student" if self.resume_from and o.co_train_student else o.student
        self.student = load_causal_lm(student_from, torch.float32, self.device, "--student")
        self.student.requires_grad_(o.co_train_student)
        self.vocab = len(self.tokenizer)
        for flag, model in (("--teacher", self.teacher), ("--student", self.student)):
            if output_vocab_size(model) < self.vocab:
                raise MoekdError(
                    f"{flag}: its output layer has {output_vocab_size(model)} entries, fewer than the "
                    f"{self.vocab} tokens of the teacher's tokenizer"
                )
        self.router_optimizer = torch.optim.AdamW(self.routers.values(), lr=o.lr, weight_decay=0.0)
        self.student_optimizer = (
            torch.optim.AdamW(self.student.parameters(), lr=self.student_lr, weight_decay=0.0)
            if o.co_train_student
            else None
        )
        self.step, self.tokens, self.position, self.loss_start = 0, 0, LoaderPosition(0, 0), None
        if self.resume_from is not None:
            self._restore(load_state(self.resume_from))

    @property
    def student_lr(self) -> float | None:
        return (self.o.student_lr or DEFAULT_STUDENT_LR) if self.o.co_train_student else None

    # ------------------------------------------------------------------ setup

    def _check_tokenizers(self) -> None:
        """The losses compare the two distributions id by id: the token-to-id mappings must be the same."""
        reference = tokenizer_fingerprint(self.tokenizer)
        same_ids, how = tokenizer_differences(
            self.student_tokenizer, len(self.tokenizer), reference["sha256"], reference["vocab_sha256"]
        )
        if not how:
            return
        what = f"the student's tokenizer ({self.o.student}) differs from the teacher's ({self.o.teacher}): {'; '.join(how)}"
        if not same_ids:
            raise MoekdError(
                f"--student: {what}; SAR compares the two distributions token by token, so use a student "
                "built with the teacher's tokenizer"
            )
        self.console.print(
            f"[yellow]warning:[/] {what}; the ids mean the same tokens, the data is tokenized with the "
            "teacher's tokenizer",
            highlight=False,
        )

    def _prepare_teacher(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        """Freeze the teacher but the routers' gate parameters `params` (made float32 master copies);
        the routers' other tensors (correction biases, expert scales) stay frozen. Optional checkpointing."""
        self.teacher.requires_grad_(False)
        for p in params.values():
            p.data = p.data.float()  # bf16 would round away updates of lr ~1e-6; autocast casts for the matmul
            p.requires_grad_(True)
        if self.o.gradient_checkpointing:
            _checkpoint_decoder_layers(self.teacher)
        return params

    def _restore(self, state: dict) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(self.resume_from / ROUTER_CHECKPOINT))
        with torch.no_grad():
            for name, p in self.routers.items():
                p.copy_(saved[name])
        self.router_optimizer.load_state_dict(state["router_optimizer"])
        if self.student_optimizer is not None:
            self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.step, self.tokens, self.loss_start = state["step"], state["tokens"], state["loss_start"]
        self.position = LoaderPosition(**state["position"])
        self.console.print(f"resuming from {self.resume_from} (step {self.step})")

    # ------------------------------------------------------------------ batches and forwards

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _batch(self, epoch: int, index: int, examples: list[int], seed: int) -> Batch:
        chosen = [self.source.examples[e] for e in examples]
        prompt_lens = [ex.prompt_len for ex in chosen]
        if self.o.responses == "data":
            sequences = [ex.input_ids for ex in chosen]
        else:  # the student answers the prompts (temperature 1, top_k 0, top_p 1, as in eval)
            prompts = [ex.input_ids[: ex.prompt_len].tolist() for ex in chosen]
            room = self.o.max_len - min(prompt_lens)
            self.student.eval()
            answers = sample_continuations(
                self.student,
                self.student_tokenizer,
                prompts,
                seed,
                min(self.o.max_new_tokens, room),
                batch_size=len(prompts),
            )
            sequences = [np.asarray(p + a[: self.o.max_len - len(p)]) for p, a in zip(prompts, answers)]
        input_ids, attention, targets = pad_sequences(sequences, prompt_lens, self.tokenizer.pad_token_id)
        return Batch(
            input_ids.to(self.device), attention.to(self.device), targets.to(self.device), examples, epoch, index
        )

    def _logits(self, model, b: Batch) -> torch.Tensor:
        """Logits [P, V] at the response positions, over the teacher tokenizer's V ids."""
        logits = model(
            input_ids=b.input_ids, attention_mask=b.attention, use_cache=False, logits_to_keep=b.targets
        ).logits
        return (logits if logits.dim() == 2 else logits[b.targets])[:, : self.vocab]

    def _student_logits(self, b: Batch) -> torch.Tensor:
        self.student.eval()
        with torch.no_grad(), self._autocast():
            return self._logits(self.student, b)

    def _teacher_terms(self, b: Batch, student_logits: torch.Tensor, backward: bool) -> dict[str, float]:
        """The teacher loss terms; with `backward`, the routers' gradients too."""
        with self.controller.active(), self.recorder.recording(), torch.set_grad_enabled(backward):
            with self._autocast():
                logits = self._logits(self.teacher, b)
            terms = teacher_loss(
                logits, student_logits, self.recorder, b.attention.flatten().bool(), self.o.teacher_kld, self.o.beta
            )
            self._check_finite(terms["loss"], "the teacher loss", b)
            if backward:  # inside the routing context: checkpointed layers replay with all experts
                terms["loss"].backward()
        return {k: v.item() for k, v in terms.items()}

    def _probe_loss(self) -> float:
        """The teacher loss on a fixed batch (the first of epoch 0; responses drawn with the seed of step 0)."""
        probe = self._order().epoch(0)[0]
        b = self._batch(0, 0, probe, step_seed(self.o.seed, 0))
        return self._teacher_terms(b, self._student_logits(b), backward=False)["loss"]

    # ------------------------------------------------------------------ training

    def _router_step(self, b: Batch) -> dict[str, float]:
        terms = self._teacher_terms(b, self._student_logits(b), backward=True)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.routers.values()), self.o.max_grad_norm)
        self._check_finite(grad_norm, "the routers' gradient norm", b)
        self.router_optimizer.step()
        self.router_optimizer.zero_grad(set_to_none=True)
        return {**terms, "grad_norm": grad_norm.item()}

    def _student_step(self, b: Batch) -> dict[str, float]:
        """One student update: reverse KL(q_s || p_T) against the updated all-expert teacher."""
        with torch.no_grad(), self.controller.active(), self._autocast():
            teacher_logits = self._logits(self.teacher, b)
        self.student.train()
        with self._autocast():
            student_logits = self._logits(self.student, b)
        loss = student_divergence(student_logits, teacher_logits).mean()
        self._check_finite(loss, "the student loss", b)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.o.max_grad_norm)
        self._check_finite(grad_norm, "the student's gradient norm", b)
        self.student_optimizer.step()
        self.student_optimizer.zero_grad(set_to_none=True)
        self.student.eval()
        return {"student_loss": loss.item(), "student_grad_norm": grad_norm.item()}

    def _order(self, start: LoaderPosition = LoaderPosition(0, 0)) -> BatchOrder:
        """Batches over all examples, epoch after epoch, seeded by --seed (moekd train's loader order)."""
        s = self.source
        return BatchOrder(np.arange(len(s)), s.lengths, s.shards, self.o.batch_tokens, self.o.seed, start=start)

    def train(self) -> SarSummary:
        o, started = self.o, time.perf_counter()
        frame = StepFrame(
            self.run,
            self.config,
            self.console,
            self.lock,
            label="sar",
            total=o.steps,
            step=self.step,
            tokens=self.tokens,
            resumed=self.resume_from is not None,
            columns=COLUMNS,
        )
        with resumable(frame.where, resume_command("sar", "train", "--out", o.out, "--resume", "auto")):
            return self._train(frame, started)

    def _train(self, frame: StepFrame, started: float) -> SarSummary:
        o = self.o
        if self.loss_start is None:
            self.loss_start = self._probe_loss()
        batches = iter(self._order(self.position))
        with frame:
            while frame.step < o.steps:
                epoch, index, examples = next(batches)
                seed = step_seed(o.seed, frame.step + 1)
                torch.manual_seed(seed)
                b = self._batch(epoch, index, examples, seed)
                record = {"step": frame.step + 1, "epoch": epoch, **self._router_step(b), "lr": o.lr}
                if o.co_train_student:
                    record.update(self._student_step(b))
                frame.done(record, b.tokens)
                self.step, self.tokens, self.position = frame.step, frame.tokens, LoaderPosition(epoch, index + 1)
                if frame.due(o.save_every) and frame.step < o.steps:
                    frame.save(self._save_checkpoint)
            train_seconds = frame.elapsed
            loss_end = self._probe_loss()
            student_out = str(student_dir(o.out)) if o.co_train_student else None
            frame.save(lambda: self._save_outputs(loss_end, train_seconds))
        return SarSummary(
            out=o.out,
            steps=self.step,
            tokens=self.tokens,
            loss_start=self.loss_start,
            loss_end=loss_end,
            resumed_from=str(self.resume_from) if self.resume_from else None,
            student_out=student_out,
            wall_seconds=time.perf_counter() - started,
            tokens_per_second=frame.tokens_per_second,
        )

    def _save_checkpoint(self) -> None:
        state = {
            "router_optimizer": self.router_optimizer.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict() if self.student_optimizer else None,
            "step": self.step,
            "tokens": self.tokens,
            "position": asdict(self.position),
            "loss_start": self.loss_start,
        }
        content = _Checkpoint(
            self.routers, *((self.student, self.student_tokenizer) if self.o.co_train_student else ())
        )
        save_checkpoint(step_dir(self.run, self.step), content, None, state, self.step, self.config, RUN_ONLY)

    def _save_outputs(self, loss_end: float, train_seconds: float) -> None:
        """The co-trained student (first), then the router file: its appearance marks a finished run."""
        import transformers

        o = self.o
        if o.co_train_student:
            self.student.save_pretrained(student_dir(o.out))
            self.student_tokenizer.save_pretrained(student_dir(o.out))
        settings = {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool, type(None)))}
        meta = RouterFileMeta(
            teacher=self.teacher_info,
            parameters={name: list(p.shape) for name, p in self.routers.items()},
            student=RouterStudent(
                name_or_path=str(o.student), weights_sha256=self.student_sha256, co_trained=o.co_train_student
            ),
            steps=self.step,
            settings=settings,
            loss_start=self.loss_start,
            loss_end=loss_end,
            train_seconds=train_seconds,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions={"moekd": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        )
        write_router_file(o.out, self.routers, meta)

    def _check_finite(self, value, what: str, b: Batch) -> None:
        advice = "Lower --lr, or check the teacher and student weights"
        check_finite(value, what, self.step + 1, b.epoch, b.index, b.examples, self.run, advice)


def _checkpoint_decoder_layers(model) -> None:
    """Activation checkpointing of every decoder layer of a model kept in eval mode (see the module docstring)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MoekdError(
            f"--gradient-checkpointing: {type(model).__name__} does not support activation checkpointing; drop the flag"
        )
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True  # what transformers checks; the layer's sub-modules stay in eval mode


def train_router(o: SarOptions, console: Console | None = None) -> SarSummary:
    """Run `moekd sar train` with options `o`; see the module docstring."""
    check_options(o)  # bad flags are refused before the lock is written beside --out
    with WriterLock(o.out, "--out") as lock:
        return RouterTrainer(o, console, lock).train()
