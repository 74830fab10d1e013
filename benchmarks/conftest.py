"""Shared fixtures of the pytest-benchmark suites: one LF-ViT, its timm backbone, inputs.

``pytest benchmarks/ --benchmark-only`` runs every suite; the defaults keep
it to a few minutes on a 2-core CPU. Options pick another model or size::

    pytest benchmarks/ --benchmark-only --dynvit-model tiny         # the quickstart LF-ViT, seconds
    # one torch thread by default; on a CPU shared with other work, time by the process's CPU time
    pytest benchmarks/ --benchmark-only --benchmark-timer time.process_time
    pytest benchmarks/ --benchmark-only --dynvit-threads 0                # torch's own thread count
    pytest benchmarks/ --benchmark-only --dynvit-device cuda --dynvit-batch 256 --dynvit-dtype bf16
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from ratios import DTYPES, PRESETS, Bench, build, configure_cuda
from torch import Tensor

from dynvit.pipeline import DynamicPipeline

MODELS = {"deit_s": "lfvit-m5", "tiny": "tiny-m3"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dynvit benchmarks")
    group.addoption("--dynvit-model", default="deit_s", help=f"{' | '.join(MODELS)} or a preset of ratios.py")
    group.addoption("--dynvit-device", default="cpu", choices=["cpu", "cuda"])
    group.addoption("--dynvit-batch", type=int, default=8, help="inference batch (training uses half)")
    group.addoption("--dynvit-dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (fp32: none)")
    group.addoption(
        "--dynvit-threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, steady on a shared CPU; 0: torch's choice)",
    )


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--dynvit-threads", default=0)
    if threads:  # before any benchmark runs, fixtures or not
        torch.set_num_threads(threads)


@dataclass
class Setup:
    pipe: DynamicPipeline
    images: Tensor
    train_images: Tensor
    labels: Tensor
    bench: Bench


@pytest.fixture(scope="session")
def setup(request: pytest.FixtureRequest) -> Setup:
    option = request.config.getoption
    device = torch.device(option("--dynvit-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--dynvit-device cuda, but torch sees no CUDA device")
    configure_cuda(device)
    model = MODELS.get(option("--dynvit-model"), option("--dynvit-model"))
    if model not in PRESETS:
        raise pytest.UsageError(f"--dynvit-model {model!r}: use one of {', '.join([*MODELS, *PRESETS])}")
    torch.manual_seed(0)
    pipe = build(model, device)
    size, batch = pipe.image_size, option("--dynvit-batch")
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device, generator=generator)
    train_batch = max(1, batch // 2)
    labels = torch.randint(pipe.backbone.num_classes, (train_batch,), device=device, generator=generator)
    bench = Bench(device, DTYPES[option("--dynvit-dtype")], warmup=1, repeats=3)
    return Setup(pipe, images, images[:train_batch], labels, bench)


@pytest.fixture
def measure(benchmark, setup: Setup):
    """``measure(fn)``: ``benchmark.pedantic`` with a warm-up round, the device synchronised after every call."""

    def run(fn, rounds: int = 3) -> object:
        def synced() -> object:
            out = fn()
            setup.bench.sync()
            return out

        return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)

    return run
