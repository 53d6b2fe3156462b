"""Shared fixtures: a tiny tokenizer, the bundled demo data and tiny teachers saved like user checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# one thread per test process: `make test` runs two workers on CI's two cores, and small ops only lose
# time to intra-op threads waiting for each other (subprocesses the tests start inherit it)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

DEMO_DATA = Path(__file__).resolve().parents[1] / "moekd" / "data" / "demo_instructions.jsonl"


@pytest.fixture(scope="session")
def data_file() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from moekd.data.prompts import format_prompt
    from moekd.data.records import load_records
    from moekd.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    records = load_records(DEMO_DATA).records
    texts = [format_prompt(r) + r.response for r in records] * 4
    train_tokenizer(texts, vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def make_teacher(tmp_path_factory, tokenizer):
    """`make_teacher(family, **config)` -> directory of a tiny saved checkpoint (built once per arguments)."""
    from moekd.tiny_models import make_tiny_model

    built: dict = {}

    def build(family: str = "mixtral", **config) -> Path:
        key = (family, tuple(sorted(config.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"teacher_{family}")
            make_tiny_model(family, tokenizer, out, seed=1, **config)
            built[key] = out
        return built[key]

    return build


@pytest.fixture(scope="session")
def load(make_teacher):
    """Load a tiny teacher by family through the user's path (from_pretrained), in eval mode."""
    from transformers import AutoModelForCausalLM

    def load_model(family, **overrides):
        return AutoModelForCausalLM.from_pretrained(str(make_teacher(family)), **overrides).eval()

    return load_model


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, make_teacher, data_file):
    """A complete topk cache of the demo data with two chunks per shard (so that reading one example
    takes a ranged read of a shard file, as at scale); shared by the remote-store and DDP tests."""
    from moekd.cache_builder.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("small_cache") / "run.zarr"
    build_cache(
        BuildOptions(
            teacher=str(make_teacher("mixtral")),
            data=str(data_file),
            out=str(out),
            k=16,
            max_prompt_len=96,
            max_len=128,
            batch_tokens=512,
            positions_per_shard=512,
            device="cpu",
        )
    )
    return out


@pytest.fixture
def interrupt_at_step(monkeypatch):
    """interrupt_at_step(step, run): call run() and stop it as a kill would, when the training loop is
    about to log metrics step `step` (that record is never written); asserts that it stopped."""
    from moekd.training.metrics import MetricsLog

    real_write = MetricsLog.write

    def interrupt(step: int, run) -> None:
        def crash(self, record):
            if record["step"] == step:
                raise KeyboardInterrupt
            real_write(self, record)

        with monkeypatch.context() as patch:
            patch.setattr(MetricsLog, "write", crash)
            with pytest.raises(KeyboardInterrupt):
                run()

    return interrupt
