"""ONNX export of the two stage graphs, and :class:`OnnxCascade`, the early-exit cascade on onnxruntime.

``export_onnx(pipe, out_dir)`` writes

- ``stage1.onnx``: images (B, 3, H, W) -> logits, exit score, the selection
  (full_index, reuse_index, region, kept) and the stage-2 feeds gathered
  from stage 1 (parent, kept_tokens, reused, as the recipe uses them);
  selection lives inside the graph, so the host only reads the exit score
  between the two graphs;
- ``stage2.onnx``: images and feeds of the samples that go on -> logits;
- ``manifest.json``: input/output names, image size, the default exit
  threshold and the versions that wrote it.

Both graphs have a dynamic batch dimension. One-stage recipes write
``stage1.onnx`` only (images -> logits). Needs ``pip install -e ".[export]"``
(onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dynvit.cascade import Stage1Graph, Stage2Graph, run_cascade, uses_plain_threshold
from dynvit.pipeline import DynamicPipeline, InferenceResult

FORMAT_VERSION = 1
INSTALL_HINT = 'install the export extra: pip install -e ".[export]" (onnx, onnxruntime, onnxscript)'


def _require(module: str) -> object:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"{module} is missing; {INSTALL_HINT}") from exc


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how far onnxruntime's outputs are from PyTorch's.

    ``max_diff``: per output, max |onnxruntime - torch| / max(1, max |torch|): the absolute difference for
    outputs within [-1, 1] (logits of a trained model are larger: there it is relative to the largest one).
    """

    directory: Path
    files: list[str]
    max_diff: dict[str, float]


def _example_images(pipe: DynamicPipeline, batch: int) -> Tensor:
    size = pipe.image_size
    device = next(pipe.parameters()).device
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def _check_exportable(pipe: DynamicPipeline, images: Tensor) -> None:
    if pipe.num_stages == 1:
        return
    if not uses_plain_threshold(pipe.exit_policy):
        raise ValueError(
            f"exit policy {type(pipe.exit_policy).__name__} decides by more than score >= threshold; "
            "an exported cascade exits on the score alone: use a policy that only defines score()"
        )
    graph = Stage1Graph(pipe)
    with torch.no_grad():
        first, second = graph(images), graph(images)
    if any(not torch.equal(a, b) for a, b in zip(first, second)):
        raise ValueError(
            f"selector {type(pipe.selector).__name__} changes its selection between calls (a random stream); "
            "an ONNX graph cannot carry its state: export a deterministic selector, or use pipe.compile()"
        )


def export_onnx(
    pipe: DynamicPipeline, out_dir: str | Path, example_batch: int = 2, validate: bool = True
) -> ExportReport:
    """Write the stage graphs of ``pipe`` (fp32) to ``out_dir``; with ``validate``, compare onnxruntime to PyTorch."""
    _require("onnx")
    _require("onnxscript")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipe.eval().float()
    images = _example_images(pipe, max(2, example_batch))
    _check_exportable(pipe, images)
    batch = torch.export.Dim("batch", min=1, max=65536)
    stage1 = Stage1Graph(pipe)
    files = ["stage1.onnx"]
    manifest: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "image_size": pipe.image_size,
        "num_stages": pipe.num_stages,
        "num_classes": pipe.backbone.num_classes,
        "stage1": {"file": "stage1.onnx", "inputs": ["images"], "outputs": stage1.output_names},
        "torch": torch.__version__,
    }
    with torch.no_grad():
        _export(stage1, (images,), out / "stage1.onnx", ["images"], stage1.output_names, {"images": {0: batch}})
        if pipe.num_stages == 2:
            stage2 = Stage2Graph(pipe)
            named = dict(zip(stage1.output_names, stage1(images)))
            feeds = tuple(named[name] for name in stage2.input_names[1:])
            shapes = {"images": {0: batch}, "feeds": tuple({0: batch} for _ in feeds)}
            _export(stage2, (images, *feeds), out / "stage2.onnx", stage2.input_names, ["logits"], shapes)
            files.append("stage2.onnx")
            manifest["stage2"] = {"file": "stage2.onnx", "inputs": stage2.input_names, "outputs": ["logits"]}
            manifest["threshold"] = float(pipe.exit_policy.threshold)
            manifest["exit_policy"] = type(pipe.exit_policy).__name__
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    files.append("manifest.json")
    diffs = validate_export(pipe, out, images) if validate else {}
    return ExportReport(out, files, diffs)


def _export(
    module: torch.nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
) -> None:
    with warnings.catch_warnings():
        # every input shares the one batch dimension on purpose; the exporter mentions it once per extra input
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    program.save(str(path))


def validate_export(pipe: DynamicPipeline, directory: str | Path, images: Tensor) -> dict[str, float]:
    """How far onnxruntime is from PyTorch for every graph output on ``images`` (see :class:`ExportReport`)."""
    cascade = OnnxCascade(directory)
    stage1 = Stage1Graph(pipe)
    with torch.no_grad():
        reference = dict(zip(stage1.output_names, stage1(images)))
        got = cascade.stage1(images.cpu())
        diffs = {f"stage1.{k}": _max_diff(reference[k], got[k]) for k in stage1.output_names}
        if pipe.num_stages == 2:
            stage2 = Stage2Graph(pipe)
            feeds = [reference[name] for name in stage2.input_names[1:]]
            diffs["stage2.logits"] = _max_diff(stage2(images, *feeds), cascade.stage2(images.cpu(), *feeds))
    return diffs


def _max_diff(reference: Tensor, other: Tensor) -> float:
    """max |reference - other| / max(1, max |reference|), 0 for empty outputs."""
    if not reference.numel():
        return 0.0
    reference = reference.detach().cpu().double()
    return float((reference - other.double()).abs().max() / reference.abs().max().clamp(min=1.0))


class OnnxCascade:
    """Early-exit inference on onnxruntime with the API of :meth:`DynamicPipeline.infer`.

    Stage 1 runs on the whole batch; the samples whose exit score is below
    the threshold go, as one sub-batch, through stage 2. Inputs are CPU
    tensors or numpy arrays (float32, (B, 3, H, W)); results are the same
    :class:`~dynvit.pipeline.InferenceResult` ``pipe.infer`` returns.
    ``threads`` sets onnxruntime's intra-op threads (None: its default).
    """

    def __init__(self, directory: str | Path, threads: int | None = None, providers: list[str] | None = None) -> None:
        ort = _require("onnxruntime")
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found; write it with: dynvit export RECIPE --out DIR")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has format {self.manifest.get('format_version')}, this dynvit reads "
                f"{FORMAT_VERSION}; export the model again"
            )
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]

        def session(stage: str) -> object:
            path = self.directory / self.manifest[stage]["file"]
            return ort.InferenceSession(str(path), options, providers=providers)

        self.image_size = int(self.manifest["image_size"])
        self.num_stages = int(self.manifest["num_stages"])
        self.threshold = self.manifest.get("threshold")
        self._stage1 = session("stage1")
        self._stage2 = session("stage2") if self.num_stages == 2 else None

    def stage1(self, images: Tensor) -> dict[str, Tensor]:
        """The stage-1 graph's outputs by name."""
        outputs = self._stage1.run(None, {"images": _numpy(images)})
        return {name: torch.from_numpy(value) for name, value in zip(self.manifest["stage1"]["outputs"], outputs)}

    def stage2(self, images: Tensor, *feeds: Tensor) -> Tensor:
        """Stage-2 logits of a sub-batch from its images and feeds (in the manifest's input order)."""
        names = self.manifest["stage2"]["inputs"]
        return torch.from_numpy(self._stage2.run(None, dict(zip(names, map(_numpy, (images, *feeds)))))[0])

    def infer(self, images: Tensor | np.ndarray, threshold: float | None = None) -> InferenceResult:
        """Stage 1, the exit decision (score >= threshold), stage 2 on the samples that go on."""
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}; "
                "resize them as the recipe's evaluation transform does"
            )
        images = images.detach().cpu().float()
        stage1 = self.stage1(images)
        if self.num_stages == 1:
            logits = stage1["logits"]
            ones = torch.ones(logits.shape[0], dtype=torch.long)
            return InferenceResult(logits=logits, exit_stage=ones, stage1_logits=logits.clone())
        exits = stage1["score"] >= (self.threshold if threshold is None else threshold)
        return run_cascade(images, stage1, exits, self.stage2, self.manifest["stage2"]["inputs"][1:])


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()
