"""Careless and hostile input through the real entry points: one named error, exit code 2, nothing lost.

Each command-line case runs ``dynvit.cli.main`` and asserts the exit code,
that the single ``error:`` line names the problem (key, file, shape), and
that no traceback is printed. Faults (NaN weights, a full disk, damaged
files, an interrupted swap) are produced as such.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training import PLAIN_TRAINING, make_disk_dataset, one_thread, tiny_overrides  # noqa: F401 - autouse

from dynvit import build_pipeline, load_recipe
from dynvit.cli import main
from dynvit.pipeline import InputError
from dynvit.training import checkpoint as ckpt
from dynvit.training import load_checkpoint_weights

TINY = str(Path(__file__).with_name("tiny.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_disk_dataset(tmp_path_factory.mktemp("data"))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and the error line; asserts there is exactly one and no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    if code != 0:
        assert len(errors) == 1, err
    return code, errors[0] if errors else ""


def train_args(data: Path, run: Path, *overrides: str) -> list[str]:
    return ["train", "quickstart", *tiny_overrides(data, run, *PLAIN_TRAINING), *overrides]


# -- recipes: refused at load, before any work, by every command ---------------------------------


RECIPE_CASES = {
    "region larger than the stage-1 grid": (["model.selector.region=20"], r"model.selector.*region size 20.*4x4"),
    "alpha 0": (["model.selector.alpha=0"], r"model.selector \(ngca\): alpha must be in \(0, 1\], got 0"),
    "alpha 1.5": (["model.selector.alpha=1.5"], r"model.selector \(ngca\): alpha.*got 1.5"),
    "first block beyond the depth": (["model.selector.first_block=9"], r"first_block=9.*4 blocks"),
    "image size the patches do not divide": (["model.image_size=60"], r"30 px.*model.image_size=60.*patch size 8"),
    "negative epochs": (["train.epochs=-3"], r"train.epochs=-3 is out of range; it must be >= 1"),
    "unknown selector": (["model.selector.type=ngcaa"], r"unknown region_selector plugin 'ngcaa'; registered: .*ngca"),
    "mistyped key": (["model.selector.regoin=3"], r"model.selector.regoin: unknown key.*accepted keys: region"),
    "crop fraction": (["data.crop_pct=0"], r"data.crop_pct=0.0 is out of range; it must be in \(0, 1\]"),
}


@pytest.mark.parametrize("command", ["show", "flops", "train", "eval"])
@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipes_are_refused_by_every_command(case, command, capsys, tmp_path):
    overrides, message = RECIPE_CASES[case]
    extra = ["--output-dir", tmp_path / "run"] if command == "train" else []
    extra += ["--out", tmp_path / "eval", "--no-progress"] if command == "eval" else []
    code, error = run_cli(capsys, command, TINY, *overrides, *extra)
    assert code == 2
    assert re.search(message, error), error
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


def test_an_empty_recipe_file_is_refused(capsys, tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    code, error = run_cli(capsys, "show", tmp_path / "empty.yaml")
    assert code == 2 and "empty.yaml: the recipe is empty" in error and "base: NAME" in error


def test_a_class_count_the_built_model_does_not_have(data, capsys, tmp_path):
    # the recipe's head has 10 classes (the quickstart default the tiny overrides replace), the data 4
    args = train_args(data, tmp_path / "run", "model.backbone.num_classes=10")
    code, error = run_cli(capsys, *args)
    assert code == 2 and "the data has 4 classes" in error and "model.backbone.num_classes=4" in error


# -- non-finite training: nothing poisoned is ever saved or called good --------------------------


def test_a_diverging_run_never_saves_or_names_poisoned_weights(data, capsys, tmp_path):
    run = tmp_path / "run"
    overrides = ["train.lr=1e6", "train.warmup_epochs=0", "train.checkpoint_every_steps=1"]
    code, error = run_cli(capsys, *train_args(data, run, *overrides))
    assert code == 2 and "not saved" in error and "no checkpoint was written yet" in error
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_after_a_nan_the_checkpoint_called_good_gives_finite_outputs(data, capsys, tmp_path, monkeypatch):
    # a good first epoch, then the gradients of one step turn to NaN
    run = tmp_path / "run"
    code, _ = run_cli(capsys, *train_args(data, run, "train.epochs=1"))
    assert code == 0
    original = torch.Tensor.backward

    def nan_gradients(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for p in pipe_params:
            if p.grad is not None:
                p.grad.fill_(float("nan"))

    pipe_params: list[torch.Tensor] = []
    real_build = build_pipeline

    def capture(*args, **kwargs):
        pipe = real_build(*args, **kwargs)
        pipe_params.extend(pipe.parameters())
        return pipe

    monkeypatch.setattr("dynvit.training.trainer.build_pipeline", capture)
    monkeypatch.setattr(torch.Tensor, "backward", nan_gradients)
    code, error = run_cli(capsys, *train_args(data, run, "train.epochs=2"), "--resume", "auto")
    assert code == 2 and "gradients are not finite at epoch 2, step 5" in error
    named = ckpt.resolve_checkpoint(run)
    assert str(named) in error and ckpt.read_meta(named)["step"] == 4
    pipe = build_pipeline(load_recipe("quickstart", tiny_overrides(data, run))).eval()
    load_checkpoint_weights(pipe, named)
    assert torch.isfinite(pipe(torch.randn(4, 3, 32, 32)).logits[1]).all()


# -- checkpoints: damaged files, another model, a full disk, an interrupted swap ------------------


def damaged_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    files = {
        "truncated.safetensors": good.read_bytes()[: good.stat().st_size // 2],
        "empty.safetensors": b"",
        "random.safetensors": os.urandom(4096),
        "random.pth": os.urandom(4096),
        "empty.pth": b"",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in files}


@pytest.mark.parametrize(
    "name", ["truncated.safetensors", "empty.safetensors", "random.safetensors", "random.pth", "empty.pth"]
)
def test_damaged_weight_files_are_named_and_never_sent_to_weights_only_false(name, data, capsys, tmp_path):
    path = damaged_files(tmp_path)[name]
    for argv in (
        ["eval", TINY, "--checkpoint", path, "--out", tmp_path / "eval", "--no-progress"],
        train_args(data, tmp_path / "run", f"train.init_backbone={path}"),
    ):
        code, error = run_cli(capsys, *argv)
        assert code == 2 and str(path) in error and "not a readable" in error, error
        assert "weights_only=False" not in error


def test_resume_from_another_models_run_names_the_keys(data, capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(data, run, "train.epochs=1"))[0] == 0
    code, error = run_cli(capsys, *train_args(data, run, "model.backbone.embed_dim=16"), "--resume", "auto")
    assert code == 2 and "written by a run of another model" in error
    assert re.search(r"other shape: backbone\.\S+ \(.*32.*\) vs \(.*16.*\)", error) and "recipe.yaml" in error


def test_resume_from_a_truncated_optimizer_state_says_which_checkpoint_to_use(data, capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(data, run, "train.epochs=1"))[0] == 0
    state = run / "checkpoints" / "last" / "state" / "optimizer.bin"
    state.write_bytes(state.read_bytes()[:100])
    code, error = run_cli(capsys, *train_args(data, run), "--resume", "auto")
    assert code == 2 and "cannot be resumed" in error and "checkpoints/best" in error


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_nothing_partial(data, capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(data, run, "train.epochs=1"))[0] == 0
    before = ckpt.read_meta(run / "checkpoints" / "last")

    def disk_full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    code, error = run_cli(capsys, *train_args(data, run), "--resume", "auto")
    assert code == 2 and "no space left on device while writing" in error and "previous checkpoint is intact" in error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]  # no .last.tmp
    assert ckpt.read_meta(run / "checkpoints" / "last") == before
    pipe = build_pipeline(load_recipe("quickstart", tiny_overrides(data, run)))
    load_checkpoint_weights(pipe, run / "checkpoints" / "last")


def test_a_real_full_disk(data, capsys, tmp_path):
    """The same on a 1 MiB tmpfs, where mounting one is allowed (root on Linux)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        run = mount / "run"
        code, error = run_cli(capsys, *train_args(data, run, "train.checkpoint_every_steps=1"))
        assert code == 2 and "no space left on device" in error
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["last"]
        step = ckpt.read_meta(run / "checkpoints" / "last")["step"]
        code, error = run_cli(capsys, *train_args(data, run, "train.checkpoint_every_steps=1"), "--resume", "auto")
        assert code == 2 and "no space left on device" in error
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["last"]
        assert ckpt.read_meta(run / "checkpoints" / "last")["step"] >= step
        assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(data, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, error = run_cli(capsys, *train_args(data, blocker / "run"))
    assert code == 2 and f"train.output_dir={blocker / 'run'} is not writable" in error and "--output-dir" in error


def test_a_recipe_yaml_that_cannot_be_written_leaves_no_temporary_file(data, capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".recipe.yaml"):
            real(self, "partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    code, error = run_cli(capsys, *train_args(data, run))
    assert code == 2 and "cannot write" in error and "recipe.yaml" in error
    assert not [p for p in run.iterdir() if p.name.startswith(".recipe.yaml")]


def test_an_interrupted_best_swap_is_recovered_for_evaluation(data, capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(data, run, "train.epochs=1"))[0] == 0
    folder = run / "checkpoints"
    best = load_file(str(folder / "best" / ckpt.WEIGHTS_NAME))
    marked = {k: v + 1 if v.is_floating_point() else v for k, v in best.items()}
    save_file(marked, str(folder / "best" / ckpt.WEIGHTS_NAME))  # tell best apart from last
    shutil.move(folder / "best", folder / ".best.old")  # killed between the two renames of a swap
    assert ckpt.run_checkpoint(run) == folder / ".best.old"
    pipe = build_pipeline(load_recipe("quickstart", tiny_overrides(data, run)))
    load_checkpoint_weights(pipe, run)
    loaded = pipe.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in marked.items())


# -- the pipeline's input policy ---------------------------------------------------------------


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    return build_pipeline(load_recipe(TINY)).eval()


def test_an_empty_batch_gives_empty_results(pipe):
    result = pipe.infer(torch.zeros(0, 3, 64, 64), threshold=0.5)
    assert result.logits.shape == (0, 10) and result.exit_stage.shape == (0,) and result.selection is None
    out = pipe(torch.zeros(0, 3, 64, 64))
    full = pipe(torch.zeros(2, 3, 64, 64))
    assert [x.shape[1:] for x in out.logits] == [x.shape[1:] for x in full.logits]
    assert out.selection.full_index.shape == (0, full.selection.full_index.shape[1])
    assert out.selection.kept.shape == (0, full.selection.kept.shape[1])


def test_float64_input_is_cast_and_integer_input_refused(pipe):
    images = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(pipe.infer(images.double(), 2.0).logits, pipe.infer(images, 2.0).logits)
    with pytest.raises(InputError, match=r"torch.uint8.*float\(\) / 255.*data.mean"):
        pipe.infer((images * 50 + 128).clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize(("channels", "fix"), [(1, r"expand\(-1, 3, -1, -1\)"), (4, r"images\[:, :3\]")])
def test_the_wrong_channel_count_names_the_fix(pipe, channels, fix):
    with pytest.raises(InputError, match=rf"expected 3-channel images, got {channels} channels; .*{fix}"):
        pipe.infer(torch.randn(2, channels, 64, 64))
    with pytest.raises(InputError, match=fix):
        pipe(torch.randn(2, channels, 64, 64))


def test_non_finite_pixels_are_refused_with_the_sample_indices(pipe):
    images = torch.randn(6, 3, 64, 64)
    images[1, 0, 3, 3] = float("nan")
    images[4, 2, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"2 of 6 images contain NaN or infinite pixels \(batch indices 1, 4\)"):
        pipe.infer(images)
    with pytest.raises(InputError, match="batch indices 1, 4"):
        pipe(images)  # eval-mode forward too
    pipe.train()
    assert torch.isnan(pipe(images).logits[1][1]).all()  # training forwards leave it to the loss check


def test_the_finite_check_is_not_fooled_by_a_sum(pipe):
    """The check sums first; a finite sum that overflows, or infinities that cancel to NaN, are still judged
    pixel by pixel."""
    huge = torch.full((2, 3, 64, 64), 3e38)  # every pixel finite, their float32 sum is not
    assert not torch.isfinite(huge.sum()) and pipe.infer(huge, 2.0).logits.shape == (2, 10)
    cancelling = torch.randn(3, 3, 64, 64)
    cancelling[2, 0, 0, 0], cancelling[2, 1, 0, 0] = float("inf"), float("-inf")
    with pytest.raises(InputError, match=r"1 of 3 images .* \(batch indices 2\)"):
        pipe.infer(cancelling)


# -- the command line's two modes --------------------------------------------------------------


def test_debug_shows_the_traceback_and_the_default_one_line(tmp_path):
    (tmp_path / "empty.yaml").write_text("{}\n")
    plain = subprocess.run(
        [sys.executable, "-m", "dynvit.cli", "show", str(tmp_path / "empty.yaml")], capture_output=True, text=True
    )
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: ")
    env = {**os.environ, "DYNVIT_DEBUG": "1"}
    debug = subprocess.run(
        [sys.executable, "-m", "dynvit.cli", "show", str(tmp_path / "empty.yaml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RecipeError" in debug.stderr


def test_a_bug_is_reported_as_one_with_the_debug_hint(capsys, monkeypatch):
    from dynvit.commands import show

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(show, "run", broken)
    code, error = run_cli(capsys, "show", TINY)
    assert code == 1 and "unexpected TypeError: unsupported operand" in error and "--debug" in error
    with pytest.raises(TypeError):
        main(["show", TINY, "--debug"])
