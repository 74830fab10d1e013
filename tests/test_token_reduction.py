"""EViT and ToMe inside a stage: against a per-sample reference written from the papers with raw tensors,
exact equivalences (no-op settings, merged duplicates), batch-order invariance, FLOPs per block, recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance
from torch import Tensor

from dynvit import build_pipeline, load_recipe
from dynvit.flops import count_flops
from dynvit.recipe import RecipeError
from dynvit.stages import StageContext, TokenGroups

TINY = Path(__file__).with_name("tiny.yaml")
ONE_STAGE = ["model.stages=1", "loss.type=ce"]


def pipeline(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_pipeline(load_recipe(TINY, list(overrides))).eval()


def images(batch: int, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# -- an independent reference: one sample at a time, attention spelled out, groups as Python sets ---------------


def reference_encode(backbone, tokens: Tensor, cls_position: Tensor, reduce, proportional: bool, blocks_recorded):
    """One sample's pass over (L, D) tokens; ``reduce(x, row, keys, members, block)`` returns new tokens and
    member lists, or None where the block does not reduce. Returns logits, CLS attention per recorded block
    spread over the original tokens, and the final tokens spread the same way."""
    model = backbone.model
    x = torch.cat([(model.cls_token + cls_position)[0], tokens], dim=0)  # (1 + L, D)
    members = [[i] for i in range(tokens.shape[0])]  # original patch tokens each current one holds
    spread_rows = {}
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        qkv = h @ attn.qkv.weight.T + attn.qkv.bias
        q, k, v = qkv.reshape(x.shape[0], 3, attn.num_heads, attn.head_dim).unbind(1)  # (N, H, d) each
        logits = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(attn.head_dim)
        if proportional:
            sizes = torch.tensor([1.0] + [float(len(m)) for m in members])
            logits = logits + sizes.log()[None, None, :]
        weights = logits.softmax(dim=-1)
        out = torch.einsum("hnm,mhd->nhd", weights, v).reshape(x.shape[0], -1)
        x = x + out @ attn.proj.weight.T + attn.proj.bias
        row = weights[:, 0, 1:].mean(dim=0)  # (L,): CLS over the current patch tokens
        if index in blocks_recorded:
            spread_rows[index] = torch.stack([_spread(row, members, i) for i in range(tokens.shape[0])])
        reduced = reduce(x, row, k[1:].mean(dim=1), members, index)
        if reduced is not None:
            x, members = reduced
        x = x + block.mlp(block.norm2(x))
    x = model.norm(x)
    logits = model.head(x[0])
    final = torch.stack([_holding(x[1:], members, i) for i in range(tokens.shape[0])])
    return logits, spread_rows, final


def _holder(members: list[list[int]], original: int) -> int | None:
    """The current token holding an original one; None once it was dropped."""
    return next((j for j, m in enumerate(members) if original in m), None)


def _spread(row: Tensor, members: list[list[int]], original: int) -> Tensor:
    j = _holder(members, original)
    return row.new_zeros(()) if j is None else row[j] / len(members[j])


def _holding(patches: Tensor, members: list[list[int]], original: int) -> Tensor:
    j = _holder(members, original)
    return patches.new_zeros(patches.shape[-1]) if j is None else patches[j]


def reference_tome(r: int, proportional: bool = True):
    def reduce(x, row, keys, members, block):
        patches, length = x[1:], x.shape[0] - 1
        merges = min(r, length // 2)
        if merges == 0:
            return None
        a_index, b_index = list(range(0, length, 2)), list(range(1, length, 2))
        sizes = [float(len(m)) for m in members]
        unit = keys / keys.norm(dim=-1, keepdim=True)
        best = []
        for a in a_index:
            similarity = [float(unit[a] @ unit[b]) for b in b_index]
            j = max(range(len(b_index)), key=lambda t: similarity[t])
            best.append((similarity[j], a, b_index[j]))
        best.sort(key=lambda t: -t[0])
        merging = best[:merges]
        into = {b: [b] for b in b_index}
        for _, a, b in merging:
            into[b].append(a)
        merged_a = {a for _, a, _ in merging}
        new_tokens, new_members = [x[0]], []
        for a in a_index:
            if a not in merged_a:
                new_tokens.append(patches[a])
                new_members.append(members[a])
        for b in b_index:
            total = sum(sizes[t] for t in into[b])
            new_tokens.append(sum(patches[t] * sizes[t] for t in into[b]) / total)
            new_members.append([i for t in into[b] for i in members[t]])
        return torch.stack(new_tokens), new_members

    return reduce


def reference_evit(keep_rate: float, blocks: list[int], fuse: bool):
    def reduce(x, row, keys, members, block):
        if block not in blocks:
            return None
        patches, length = x[1:], x.shape[0] - 1
        keep = math.ceil(keep_rate * length)
        order = sorted(range(length), key=lambda t: -float(row[t]))
        kept, rest = order[:keep], order[keep:]
        new_tokens = [x[0]] + [patches[t] for t in kept]
        new_members = [members[t] for t in kept]
        if fuse:
            new_tokens.append(sum(patches[t] * row[t] for t in rest))
            new_members.append([i for t in rest for i in members[t]])
        return torch.stack(new_tokens), new_members

    return reduce


def run_reference(pipe, batch: Tensor, reduce, proportional: bool, blocks_recorded=()):
    backbone = pipe.backbone
    grid = backbone.grid_size(pipe.image_size)
    pos = backbone.position_embedding(grid)
    tokens = backbone.embed_patches(batch) + pos[:, 1:]
    results = [reference_encode(backbone, t, pos[:, :1], reduce, proportional, blocks_recorded) for t in tokens]
    return results, tokens, pos


def assert_matches_reference(pipe, batch: Tensor, reduce, proportional: bool, recorded: tuple[int, ...]) -> None:
    """The one-stage pipeline's reduced pass equals the reference: logits, spread final tokens, spread CLS rows."""
    with torch.no_grad():
        results, tokens, pos = run_reference(pipe, batch, reduce, proportional, recorded)
        context = StageContext(index=0, grid=(8, 8), attention_blocks=recorded, reducer=pipe.stages[0].reducer)
        out = pipe.backbone.encode(tokens, pos[:, :1], context)
    for b, (logits, rows, final) in enumerate(results):
        torch.testing.assert_close(out.logits[b], logits, **tolerance())
        torch.testing.assert_close(out.tokens[b, 1:], final, **tolerance())
        for block, row in rows.items():
            torch.testing.assert_close(out.class_attention[block][b], row, **tolerance())


@pytest.mark.parametrize("proportional", [True, False])
def test_tome_matches_a_per_sample_reference(proportional):
    pipe = pipeline(
        *ONE_STAGE,
        "model.reduction.type=tome",
        "model.reduction.r=5",
        f"model.reduction.proportional_attention={proportional}",
    )
    assert_matches_reference(pipe, images(3), reference_tome(5, proportional), proportional, (0, 2, 3))
    # 64 patch tokens lose 5 per block: 59, 54, 49, 44 leave the four blocks
    assert [pipe.stages[0].reducer.reduced_length(n, 0) for n in (64, 59, 54, 49)] == [59, 54, 49, 44]


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_a_per_sample_reference(fuse):
    pipe = pipeline(
        *ONE_STAGE,
        "model.reduction.type=evit",
        "model.reduction.keep_rate=0.6",
        "model.reduction.blocks=[1,2]",
        f"model.reduction.fuse={fuse}",
    )
    assert_matches_reference(pipe, images(3, seed=2), reference_evit(0.6, [1, 2], fuse), False, (1, 2, 3))


def test_the_evit_default_blocks_are_the_papers_for_deit_s():
    reducer = pipeline(*ONE_STAGE, "model.reduction.type=evit").stages[0].reducer
    assert [b for b in range(12) if reducer.reduces_at(b, 12)] == [3, 6, 9]
    assert [b for b in range(4) if reducer.reduces_at(b, 4)] == [1, 2, 3]
    # DeiT-S at 0.7: 196 -> 138 (+1 fused) -> 98 (+1) -> 70 (+1) patch tokens (the paper's 0.7 keep rate)
    lengths = [196]
    for block in (3, 6, 9):
        lengths.append(reducer.reduced_length(lengths[-1], block))
    assert lengths == [196, 139, 99, 71]


def test_the_evit_keep_rate_shrinks_along_the_authors_cosine_while_training():
    pipe = pipeline(
        *ONE_STAGE,
        "model.reduction.type=evit",
        "model.reduction.keep_rate=0.5",
        "model.reduction.shrink_start_epoch=2",
        "model.reduction.shrink_epochs=4",
    )
    reducer = pipe.stages[0].reducer
    pipe.train()
    assert reducer.current_keep_rate == 0.5  # no progress given: the target
    # hand values: 1 before epoch 2, then 0.5 + 0.5 * (cos(pi * t / 4) + 1) / 2, then 0.5
    halfway = 0.5 + 0.25 * (math.cos(math.pi / 4) + 1)
    expected = {0.0: 1.0, 1.9: 1.0, 2.0: 1.0, 3.0: halfway, 4.0: 0.75, 6.0: 0.5, 9: 0.5}
    for epochs, rate in expected.items():
        pipe.set_training_progress(epochs)  # the pipeline hands it to every plugin that has a schedule
        assert reducer.current_keep_rate == pytest.approx(rate, abs=1e-12), epochs
    pipe.set_training_progress(1.0)
    assert reducer.reduced_length(16, 1) == 16  # keep everything before the shrink starts
    with torch.no_grad():
        assert torch.equal(pipe(images(2)).logits[0], pipeline(*ONE_STAGE).train()(images(2)).logits[0])
    pipe.set_training_progress(4.0)
    assert reducer.reduced_length(16, 1) == 12 + 1  # ceil(0.75 * 16) kept, plus the fused token
    pipe.eval()
    assert reducer.current_keep_rate == 0.5 and reducer.reduced_length(16, 1) == 8 + 1  # eval: the target


@pytest.mark.parametrize(
    "setting",
    [
        ["model.reduction.type=tome", "model.reduction.r=0"],
        ["model.reduction.type=evit", "model.reduction.keep_rate=1.0"],
    ],
)
def test_a_reducer_that_removes_nothing_changes_nothing(setting):
    plain, reduced = pipeline(), pipeline(*setting)
    assert reduced.stages[1].reducer is not None
    batch = images(4)
    a, b = plain(batch), reduced(batch)
    for sa, sb in zip(a.stages, b.stages):
        torch.testing.assert_close(sb.logits, sa.logits, **tolerance())
        torch.testing.assert_close(sb.tokens, sa.tokens, **tolerance())
    for block, row in a.stages[0].class_attention.items():
        torch.testing.assert_close(b.stages[0].class_attention[block], row, **tolerance())


def test_merging_exact_duplicates_with_proportional_attention_changes_nothing():
    """Tokens in identical pairs evolve identically; merging each pair into one token of size 2 with
    proportional attention must give the CLS token, its attention and every token what the full sequence gives."""
    plain = pipeline(*ONE_STAGE)
    merged = pipeline(*ONE_STAGE, "model.reduction.type=tome", "model.reduction.r=32", "model.reduction.blocks=[0]")
    torch.manual_seed(3)
    pairs = torch.randn(2, 32, plain.backbone.embed_dim)
    tokens = pairs.repeat_interleave(2, dim=1)  # (2, 64, D): positions 2k and 2k+1 equal
    cls = torch.zeros(1, 1, plain.backbone.embed_dim)
    with torch.no_grad():
        full = plain.backbone.encode(tokens, cls, StageContext(0, (8, 8), attention_blocks=(1, 3)))
        halved = merged.backbone.encode(
            tokens, cls, StageContext(0, (8, 8), attention_blocks=(1, 3), reducer=merged.stages[0].reducer)
        )
    torch.testing.assert_close(halved.logits, full.logits, **tolerance())
    torch.testing.assert_close(halved.tokens, full.tokens, **tolerance())
    for block in (1, 3):
        torch.testing.assert_close(halved.class_attention[block], full.class_attention[block], **tolerance())
    # without proportional attention the merged pair weighs as one token: the result moves
    merged.stages[0].reducer.proportional_attention = False
    with torch.no_grad():
        unweighted = merged.backbone.encode(tokens, cls, StageContext(0, (8, 8), reducer=merged.stages[0].reducer))
    assert (unweighted.logits - full.logits).abs().max() > 1e-3


def test_token_groups_by_hand():
    groups = TokenGroups.identity(1, 4)
    # tokens 0 and 2 merge into new slot 1, token 1 goes to slot 0, token 3 is dropped (slot 2 of 2)
    groups = groups.regroup(torch.tensor([[1, 0, 1, 2]]), 2)
    assert groups.owner.tolist() == [[1, 0, 1, 2]] and groups.sizes.tolist() == [[1.0, 2.0]]
    assert groups.spread_attention(torch.tensor([[0.3, 0.6]]))[0].tolist() == pytest.approx([0.3, 0.3, 0.3, 0.0])
    spread = groups.spread_tokens(torch.tensor([[[1.0], [2.0]]]))
    assert spread.flatten().tolist() == [2.0, 1.0, 2.0, 0.0]
    # a second step: slots 0 and 1 merge into slot 0 of 1; original tokens follow their holders
    groups = groups.regroup(torch.tensor([[0, 0]]), 1)
    assert groups.owner.tolist() == [[0, 0, 0, 1]] and groups.sizes.tolist() == [[3.0]]


@pytest.mark.parametrize(
    "reduction",
    [
        ["model.reduction.type=tome", "model.reduction.r=3", "model.reduction.stage=[0,1]"],
        ["model.reduction.type=evit", "model.reduction.keep_rate=0.5", "model.reduction.stage=0"],
    ],
)
def test_lfvit_with_reduction_is_batch_order_invariant_and_infer_matches_training(reduction):
    pipe = pipeline(*reduction)
    batch, order = images(6), torch.tensor([4, 0, 5, 2, 1, 3])
    out, permuted = pipe(batch), pipe(batch[order])
    for s, p in zip(out.stages, permuted.stages):
        torch.testing.assert_close(p.logits, s.logits[order], **tolerance())
    torch.testing.assert_close(permuted.selection.full_index, out.selection.full_index[order])
    # nobody exits: inference runs stage 2 on everything and agrees with the training-mode pass
    result = pipe.infer(batch, threshold=2.0)
    torch.testing.assert_close(result.logits, out.stages[1].logits, **tolerance())
    torch.testing.assert_close(result.selection.full_index, out.selection.full_index)


def test_stage1_reduction_changes_what_the_selector_reads_but_keeps_it_a_distribution():
    plain, reduced = pipeline(), pipeline("model.reduction.type=tome", "model.reduction.r=4", "model.reduction.stage=0")
    batch = images(4)
    a, b = plain(batch).stages[0], reduced(batch).stages[0]
    for block in a.class_attention:
        assert b.class_attention[block].shape == a.class_attention[block].shape == (4, 16)
    # merging happens from block 0, so block 3's attention differs, yet sums to the CLS mass over patches
    assert not torch.allclose(b.class_attention[3], a.class_attention[3])
    assert (b.class_attention[3].sum(1) > 0.5).all() and (b.class_attention[3].sum(1) <= 1 + 1e-6).all()


def test_counted_flops_follow_the_reduced_token_counts_per_block():
    """A one-stage tiny ViT: its count is the sum over blocks of the per-block formula at each block's token
    counts, plus what the reducer itself multiplies (ToMe's similarities)."""
    plain = pipeline(*ONE_STAGE)
    tome = pipeline(*ONE_STAGE, "model.reduction.type=tome", "model.reduction.r=8")
    d, heads = plain.backbone.embed_dim, plain.backbone.model.blocks[0].attn.num_heads
    hidden = plain.backbone.model.blocks[0].mlp.fc1.out_features
    patch = 8 * 8 * 3 * d * 64 + d * 10  # patch embedding of 64 patches and the head

    def blocks(entering: list[int], leaving: list[int]) -> int:
        total = 0
        for n, m in zip(entering, leaving):
            total += n * d * 3 * d + 2 * n * n * d + n * d * d  # qkv, two attention products, projection
            total += 2 * m * d * hidden  # the MLP on what is left
        return total

    full = [65] * 4
    assert count_flops(plain).stages[0] * 1e9 == pytest.approx(patch + blocks(full, full), rel=1e-9)
    leaving = list(tome.block_lengths(0))
    assert leaving == [57, 49, 41, 33] and count_flops(tome).block_lengths == (tuple(leaving),)
    entering = [65, *leaving[:-1]]
    # ToMe's matching: (n_a x n_b) similarities of head-mean keys of width d / heads
    similarity = sum(((n - 1 + 1) // 2) * ((n - 1) // 2) * (d // heads) for n in entering)
    counted = count_flops(tome).stages[0] * 1e9
    assert counted == pytest.approx(patch + blocks(entering, leaving) + similarity, rel=1e-9)
    assert counted < 0.8 * count_flops(plain).stages[0] * 1e9  # 3.52 M against 4.67 M


def test_bundled_combination_recipes_are_one_section_away_from_lfvit():
    lfvit = load_recipe("lfvit_deit_s")
    for name, kind in (("lfvit_evit_deit_s", "evit"), ("lfvit_tome_deit_s", "tome")):
        recipe = load_recipe(name)
        assert recipe.model.reduction.type == kind
        recipe.model.reduction = lfvit.model.reduction
        assert recipe == lfvit, f"{name} differs from lfvit_deit_s beyond model.reduction"
    one = build_pipeline(load_recipe("deit_s", ["model.reduction.type=tome", "model.backbone.depth=1"]))
    assert one.stages[0].reducer is not None and one.stages[0].reducer.r == 8  # stage -1: its only stage


def test_bad_reduction_settings_are_refused_with_the_key():
    with pytest.raises(RecipeError, match=r"model.reduction.stage: 2 names no stage .* 2-stage"):
        load_recipe(TINY, ["model.reduction.type=tome", "model.reduction.stage=2"])
    with pytest.raises(RecipeError, match="model.reduction.*keep_rate must be in"):
        load_recipe(TINY, ["model.reduction.type=evit", "model.reduction.keep_rate=0"])
    with pytest.raises(RecipeError, match="model.reduction.*blocks .* reach beyond"):
        load_recipe(TINY, ["model.reduction.type=evit", "model.reduction.blocks=[7]"])
    with pytest.raises(RecipeError, match="model.reduction.ratio: unknown key .* accepted keys: r, blocks"):
        load_recipe(TINY, ["model.reduction.type=tome", "model.reduction.ratio=2"])
    with pytest.raises(RecipeError, match="cannot share a stage with encoder hooks"):
        load_recipe("quickstart_dvt", ["model.reduction.type=tome", "model.reduction.stage=-1"])
    with pytest.raises(RecipeError, match="stage 2's hooks read its per-block records"):
        load_recipe("quickstart_dvt", ["model.reduction.type=tome", "model.reduction.stage=0"])


def test_evit_trains_its_fused_token_through_the_attention_weights():
    pipe = pipeline(*ONE_STAGE, "model.reduction.type=evit", "model.reduction.keep_rate=0.5").train()
    loss = F.cross_entropy(pipe(images(4)).stages[0].logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    # the query weights of a reducing block get gradient from the fusion weights as well as attention
    grad = pipe.backbone.model.blocks[1].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
