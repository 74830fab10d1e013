"""Writes lfvit_before.pt: tiny LF-ViT pipelines' weights, inputs and outputs, as the two-stage code computed them.

Run once at commit 80b4d67 (before the N-stage pipeline): ``python tests/data/make_lfvit_before.py``.
tests/test_pipeline.py loads the file and checks that today's pipeline gives the same outputs on the same weights.
"""

from pathlib import Path

import torch

from dynvit import build_pipeline, load_recipe

TINY = Path(__file__).parents[1] / "tiny.yaml"
CASES = {
    "ngca": [],
    "random": ["model.selector.type=random"],
    "max_gca": ["model.selector.type=max_gca"],
    "topk_gca": ["model.selector.type=topk_gca"],
    "no_fusion": ["model.fuser.type=none"],
    "no_reuse": ["model.reuser.type=none"],
    "ce_ce": ["loss.type=ce_ce"],
    "whole_image": [],
    "one_stage": ["model.stages=1", "loss.type=ce"],
}
SHRINK = ["model.backbone.depth=4", "model.backbone.embed_dim=32", "model.backbone.num_heads=2"]


def main() -> None:
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.arange(8) % 10
    saved = {"images": images, "target": target}
    for name, overrides in CASES.items():
        torch.manual_seed(0)
        first = [] if name == "one_stage" else ["model.selector.first_block=2"]
        pipe = build_pipeline(load_recipe(TINY, SHRINK + first + overrides)).eval()
        with torch.no_grad():  # sharper attention and logits than the initialisation gives, as training makes them
            for p in pipe.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        pipe.whole_image_stage2 = name == "whole_image"
        saved[f"{name}.state"] = {k: v.clone() for k, v in pipe.state_dict().items()}
        with torch.no_grad():
            out = pipe(images)
            for i, logits in enumerate(out.logits):
                saved[f"{name}.logits{i + 1}"] = logits
            saved[f"{name}.loss"] = pipe.compute_loss(out, target)
            if out.selection is not None:
                for field in ("full_index", "reuse_index", "region", "kept"):
                    saved[f"{name}.{field}"] = getattr(out.selection, field)
            # half the images exit: the threshold between the 4th and 5th most confident
            confidence = out.logits[0].softmax(-1).amax(-1).sort().values
            threshold = float(confidence[3:5].mean()) if len(out.logits) == 2 else 0.5
            saved[f"{name}.threshold"] = torch.tensor(threshold)
            result = pipe.infer(images, threshold=threshold)
        saved[f"{name}.infer_logits"] = result.logits
        saved[f"{name}.exit_stage"] = result.exit_stage
    torch.save(saved, Path(__file__).with_name("lfvit_before.pt"))


if __name__ == "__main__":
    main()
