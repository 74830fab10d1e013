"""Training step (forward, loss, backward, AdamW): LF-ViT with both stages against the timm backbone.

Group ``train``: the backbone alone, LF-ViT with region selection, and
LF-ViT's first phase (stage 2 on the whole image), on the same batch.
"""

from __future__ import annotations

import pytest
import torch
from ratios import train_steps


@pytest.fixture(scope="module")
def steps(setup):
    setup.pipe.train()
    yield train_steps(setup.pipe, setup.train_images, setup.labels, setup.bench)
    setup.pipe.eval()


@pytest.mark.benchmark(group="train")
@pytest.mark.parametrize("name", ["backbone", "LF-ViT", "LF-ViT whole image"])
def test_train_step(steps, measure, name):
    step = steps[name]
    before = [p.detach().clone() for p in step.optimizer.param_groups[0]["params"][:2]]
    measure(step)
    after = step.optimizer.param_groups[0]["params"][:2]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the step really updated the weights
