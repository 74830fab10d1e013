"""The CUDA paths against the CPU: pipeline, training steps, resume and evaluation (``pytest -m cuda``).

Skipped without a GPU. With TF32 off, a CUDA result must equal the CPU's to float32 rounding, so any
difference larger than that is a bug in a CUDA path, not rounding; with TF32 at PyTorch's default (on for
cuDNN convolutions) the TF32 tolerance applies, except where both sides use the same kernel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, tolerance
from dynvit.plugins.selectors import window_sums
from test_numerics import EXIT_MARGIN, WINDOW_MARGIN, peaked_pipeline
from test_training import PLAIN_TRAINING, make_disk_dataset, max_difference, metrics_of, tiny_overrides, weights_of

from dynvit import build_pipeline, load_recipe
from dynvit.training import checkpoint as ckpt

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def tf32(request):
    """Set cuDNN's and cuBLAS's TF32 switches to ``request.param`` for one test, then restore them."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# -- the pipeline -------------------------------------------------------------------------------------------


def test_stage2_uses_the_kernels_of_timm_under_default_tf32(images):
    """With TF32 on for convolutions only (PyTorch's default), stage 2 must still equal timm to float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    try:
        torch.manual_seed(0)
        recipe = tiny_recipe("model.selector.type=full_image", "model.fuser.type=none", "model.reuser.type=none")
        pipe = build_pipeline(recipe).eval().cuda()
        images = images.cuda()
        index = torch.stack([torch.randperm(64, device="cuda")[:20] for _ in range(images.shape[0])])
        with torch.no_grad():
            whole = pipe.backbone.embed_patches(images)
            selected = pipe.backbone.embed_patches(images, index)
            expected, logits = pipe.backbone.model(images), pipe(images).logits[1]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    gathered = torch.gather(whole, 1, index.unsqueeze(-1).expand(-1, -1, whole.shape[-1]))
    torch.testing.assert_close(selected, gathered, **tolerance(tf32=False))
    torch.testing.assert_close(logits, expected, **tolerance(tf32=False))


@pytest.mark.parametrize("tf32", [False, True], indirect=True, ids=["tf32-off", "tf32-on"])
def test_pipeline_on_cuda_matches_the_cpu(tf32):
    cpu, cuda = peaked_pipeline("cpu"), peaked_pipeline("cuda")
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, stage1 = cpu(images), cpu.run_stage1(images)
        out, stage1_cuda = cuda(images.cuda()), cuda.run_stage1(images.cuda())
    tol = tolerance(torch.float32, "cuda", tf32=tf32)
    torch.testing.assert_close(out.logits[0].cpu(), expected.logits[0], **tol)

    # the same window and tokens wherever the CPU's window wins clearly (see test_numerics for the margin)
    windows = window_sums(cpu.selector.gca(stage1), stage1.grid, cpu.selector.region).flatten(1)
    windows_cuda = window_sums(cuda.selector.gca(stage1_cuda), stage1.grid, cpu.selector.region).flatten(1)
    torch.testing.assert_close(windows_cuda.cpu(), windows, atol=0, rtol=WINDOW_MARGIN / 2)
    top2 = windows.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > WINDOW_MARGIN * top2[:, 0]
    assert clear.float().mean() >= 0.3
    assert torch.equal(out.selection.region.cpu()[clear], expected.selection.region[clear])
    same = (out.selection.full_index.sort(1).values.cpu() == expected.selection.full_index.sort(1).values).all(1)
    assert same[clear].all()
    torch.testing.assert_close(out.logits[1].cpu()[same], expected.logits[1][same], **tol)

    # early exit on the compacted sub-batch
    confidence = expected.logits[0].softmax(-1).amax(-1)
    eta = confidence.median().item()
    exact, result = cpu.infer(images, threshold=eta), cuda.infer(images.cuda(), threshold=eta)
    decided = (confidence - eta).abs() > EXIT_MARGIN
    assert torch.equal(result.exit_stage.cpu()[decided], exact.exit_stage[decided])
    agree = decided & same & (result.exit_stage.cpu() == exact.exit_stage)
    torch.testing.assert_close(result.logits.cpu()[agree], exact.logits[agree], **tol)


def test_pipeline_follows_a_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    pipe = peaked_pipeline("cuda:1")
    images = torch.randn(8, 3, 64, 64, device="cuda:1")
    result = pipe.infer(images, threshold=0.5)
    assert result.logits.device == result.exit_stage.device == torch.device("cuda", 1)
    from dynvit.evaluation.throughput import measure_throughput

    assert measure_throughput(pipe, images, 0.5, repeats=1, warmup=0).device == "cuda:1"


# -- training, resume, evaluation ------------------------------------------------------------------------

# momentum SGD: an update is linear in the gradient, so float32 rounding in the gradient stays float32
# rounding in the weights (Adam divides by the gradient's root mean square and can amplify it)
COMPARED = [*PLAIN_TRAINING, "train.opt=momentum", "data.train_limit=24", "train.epochs=2"]
COMPARED += ["train.full_image_epochs=1", "train.ema=true", "train.ema_decay=0.9"]


def _train(data: Path, out: Path, cuda: bool, *args: str) -> subprocess.CompletedProcess:
    """``dynvit train`` in its own process; on CUDA with TF32 off (NVIDIA_TF32_OVERRIDE=0) for float32 results."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "dynvit.cli", "train", "quickstart", *tiny_overrides(data, out, *COMPARED)]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    device = re.search(r"process\(es\), (\S+), mixed precision", done.stdout)
    assert device and device.group(1).startswith("cuda" if cuda else "cpu"), done.stdout[-2000:]
    return done


def test_training_resume_and_evaluation_on_cuda_match_the_cpu(tmp_path):
    data = make_disk_dataset(tmp_path)
    cpu, cuda, resumed = tmp_path / "cpu", tmp_path / "cuda", tmp_path / "resumed"
    _train(data, cpu, False)
    _train(data, cuda, True)
    _train(data, resumed, True, "--max-steps", "2")  # stops inside the first epoch
    assert ckpt.read_meta(resumed / "checkpoints" / "last")["epoch_step"] == 2
    _train(data, resumed, True, "--resume", "auto")

    strict = tolerance(torch.float32, "cuda", tf32=False)["atol"]
    last = {run: run / "checkpoints" / "last" for run in (cpu, cuda, resumed)}
    assert ckpt.read_meta(last[cuda])["step"] == ckpt.read_meta(last[cpu])["step"] == 6
    assert max_difference(weights_of(last[cuda]), weights_of(last[cpu])) <= strict
    assert max_difference(weights_of(last[resumed]), weights_of(last[cuda])) <= strict
    ema = ckpt.EMA_WEIGHTS_NAME
    assert max_difference(weights_of(last[cuda], ema), weights_of(last[cpu], ema)) <= strict
    for a, b in zip(metrics_of(cuda), metrics_of(cpu)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=strict, rel=strict)
        assert (a["val_acc_stage1"], a["val_acc_stage2"]) == (b["val_acc_stage1"], b["val_acc_stage2"])

    # evaluation of the CUDA-trained weights, on each device
    from dynvit.evaluation import evaluate

    recipe = load_recipe(cuda / "recipe.yaml")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on = {
            device: evaluate(recipe, str(cuda), tmp_path / f"eval-{device}", device=device, progress=False)
            for device in ("cpu", "cuda")
        }
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert on["cuda"]["device"].startswith("cuda") and on["cpu"]["device"] == "cpu"
    assert [s["top1"] for s in on["cuda"]["stages"]] == [s["top1"] for s in on["cpu"]["stages"]]
    assert on["cuda"]["curve"]["top1"] == on["cpu"]["curve"]["top1"]
    assert on["cuda"]["curve"]["exit_fraction"] == on["cpu"]["curve"]["exit_fraction"]
    saved_json = json.loads((tmp_path / "eval-cuda" / "metrics.json").read_text())
    assert saved_json["stages"] == on["cuda"]["stages"]
