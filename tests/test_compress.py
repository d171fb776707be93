"""Structured compression: channel groups, masks, physical compression, cost, deployment.

Every expectation here is derived independently of the library: group sizes and MACs from the architecture
written out by hand, equivalence by running the masked and the compressed model side by side, cost against
``torch.utils.flop_counter`` and ``sum(p.numel())``.
"""
from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tailwise.compress.cost import cost, count_macs, count_params
from tailwise.compress.groups import channel_groups
from tailwise.compress.masks import ChannelMasks
from tailwise.compress.slim import CompressionError, compress
from tailwise.deploy import load_model, save_model
from tailwise.models import NormedLinear, build_model

CIFAR = (1, 3, 32, 32)
IMAGENET_SMALL = (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------- helpers
def make(name: str, num_classes: int = 10, normed: bool = False, seed: int = 0) -> nn.Module:
    """A model with random (non-trivial) BN statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes, normed_head=normed) if normed else build_model(name, num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def groups_of(model, shape=CIFAR, scope="all"):
    return channel_groups(model, torch.randn(shape), scope)


def random_prune(masks: ChannelMasks, seed: int, single: int | None = None) -> dict[int, torch.Tensor]:
    """Prune a random subset (possibly empty, never all) of every group; group ``single`` down to 1 channel."""
    g = torch.Generator().manual_seed(seed)
    selection = {}
    for gi, group in enumerate(masks.groups):
        perm = torch.randperm(group.size, generator=g)
        k = group.size - 1 if gi == single else int(torch.randint(0, group.size, (1,), generator=g))
        selection[gi] = perm[:k]
    masks.prune(selection)
    return selection


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max())


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels), name
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = (m.num_features, m.num_features)
            assert m.weight.shape == m.running_mean.shape == (m.num_features,), name
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
            assert m.weight.shape == (m.out_features, m.in_features), name
        elif isinstance(m, NormedLinear):
            out[name] = (m.in_features, m.out_features)
            assert m.weight.shape == (m.in_features, m.out_features), name
    return out


def synthetic_batch(n=6, size=32, seed=0) -> torch.Tensor:
    """A few normalised images of the synthetic data set (what a real batch looks like to the model)."""
    from tailwise.data.sources import synthetic_split

    images = torch.from_numpy(synthetic_split(4, 2, size, seed=seed).images[:n]).float() / 255
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------- 1. discovery
@pytest.mark.parametrize("normed", [False, True])
def test_resnet32_groups(normed):
    model = make("resnet32", normed=normed)
    groups = groups_of(model)
    assert len(groups) == 18
    internal = [g for g in groups if g.kind == "internal"]
    residual = [g for g in groups if g.kind == "residual"]
    assert len(internal) == 15 and len(residual) == 3
    assert sorted(g.size for g in internal) == [16] * 5 + [32] * 5 + [64] * 5
    assert sorted(g.size for g in residual) == [16, 32, 64]
    assert sum(g.size for g in groups) == 5 * 16 + 5 * 32 + 5 * 64 + 16 + 32 + 64 == 672

    # block-internal groups: conv1 -> bn1 -> conv2 of one block
    for stage in (1, 2, 3):
        for b in range(5):
            p = f"layer{stage}.{b}"
            (g,) = [g for g in internal if g.producers == [f"{p}.conv1"]]
            assert g.consumers == [f"{p}.conv2"] and g.norms == [f"{p}.bn1"]

    by_size = {g.size: g for g in residual}
    s1, s2, s3 = by_size[16], by_size[32], by_size[64]
    assert set(s1.producers) == {"conv1"} | {f"layer1.{b}.conv2" for b in range(5)}
    assert set(s2.producers) == {"layer2.0.shortcut.0"} | {f"layer2.{b}.conv2" for b in range(5)}
    assert set(s3.producers) == {"layer3.0.shortcut.0"} | {f"layer3.{b}.conv2" for b in range(5)}
    assert set(s1.consumers) == {f"layer1.{b}.conv1" for b in range(5)} | {"layer2.0.conv1", "layer2.0.shortcut.0"}
    assert set(s2.consumers) == {f"layer2.{b}.conv1" for b in range(1, 5)} | {"layer3.0.conv1", "layer3.0.shortcut.0"}
    assert set(s3.consumers) == {f"layer3.{b}.conv1" for b in range(1, 5)} | {"fc"}
    assert set(s2.norms) == {"layer2.0.shortcut.1"} | {f"layer2.{b}.bn2" for b in range(5)}
    assert isinstance(model.fc, NormedLinear if normed else nn.Linear)

    check_slices(model, groups)
    only_internal = groups_of(model, scope="internal")
    assert [g.name for g in only_internal] == [g.name for g in internal]
    assert [g.name for g in groups_of(model, scope="residual")] == [g.name for g in residual]
    with pytest.raises(ValueError, match="scope"):
        groups_of(model, scope="everything")


def check_slices(model, groups):
    """Every member tensor is sliced along the right dimension by a permutation of the group's channels, and
    the classifier's outputs and the stem's inputs are never touched."""
    head = model.fc
    head_out_dim = 1 if isinstance(head, NormedLinear) else 0
    for g in groups:
        members = {(s.module_name, s.tensor_name): s for s in g.slices}
        for s in g.slices:
            assert sorted(s.index.tolist()) == list(range(g.size)), (g.name, s.module_name)
            tensor = getattr(model.get_submodule(s.module_name), s.tensor_name)
            assert tensor.shape[s.dim] == g.size
        for name in g.producers:
            assert members[(name, "weight")].dim == 0
        for name in g.norms:
            assert members[(name, "weight")].dim == 0 and members[(name, "bias")].dim == 0
        for name in g.consumers:
            expected = 0 if isinstance(model.get_submodule(name), NormedLinear) else 1
            assert members[(name, "weight")].dim == expected
        assert ("fc", "bias") not in members
        assert all(not (s.module_name == "fc" and s.dim == head_out_dim) for s in g.slices)
        assert all(not (s.module_name == "conv1" and s.dim == 1) for s in g.slices)
    # each (tensor, dim) belongs to at most one group
    seen = [(s.module_name, s.tensor_name, s.dim) for g in groups for s in g.slices]
    assert len(seen) == len(set(seen))


def test_resnet18_groups():
    model = make("resnet18")
    groups = groups_of(model, IMAGENET_SMALL)
    internal = [g for g in groups if g.kind == "internal"]
    residual = [g for g in groups if g.kind == "residual"]
    assert len(groups) == 12 and len(internal) == 8 and len(residual) == 4
    # internal: conv1 of each of the 2 BasicBlocks per stage; residual: the four stage streams
    widths = (64, 128, 256, 512)
    assert sorted(g.size for g in internal) == sorted(w for w in widths for _ in range(2))
    assert sorted(g.size for g in residual) == list(widths)
    assert sum(g.size for g in groups) == 2 * (64 + 128 + 256 + 512) + (64 + 128 + 256 + 512) == 2880
    by_size = {g.size: g for g in residual}
    assert set(by_size[64].producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(by_size[512].producers) == {"layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"}
    assert "fc" in by_size[512].consumers
    assert {"layer3.0.conv1", "layer3.0.downsample.0"} <= set(by_size[128].consumers)
    check_slices(model, groups)


# -------------------------------------------------------------------------------- 2. masked == compressed
CASES = [("resnet32", False, CIFAR), ("resnet32", True, CIFAR), ("resnet18", False, IMAGENET_SMALL)]


@pytest.mark.parametrize("name,normed,shape", CASES, ids=["resnet32", "resnet32-normed", "resnet18"])
def test_masked_equals_compressed(name, normed, shape):
    model = make(name, normed=normed)
    groups = groups_of(model, shape)
    masks = ChannelMasks(model, groups)
    single = next(i for i, g in enumerate(groups) if "fc" in g.consumers)  # the stream feeding the classifier
    random_prune(masks, seed=11, single=single)
    assert int(masks.keep[single].sum()) == 1

    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(4, *shape[1:], generator=g)]
    inputs.append(synthetic_batch(size=shape[-1]))
    slim = compress(model, masks, torch.randn(shape), check_inputs=inputs)

    # the original is untouched (same tensors, same shapes, same values)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k

    # logits agree on fresh inputs and on a real batch
    model.eval(), slim.eval()
    with torch.no_grad():
        for x in [torch.randn(5, *shape[1:], generator=g), *inputs]:
            assert rel_diff(model(x), slim(x)) <= 1e-5
    assert slim.compression_check <= 1e-5

    # layer shapes: live counts, computed directly from the keep masks
    live = {}
    for group, keep in zip(groups, masks.keep):
        n = int(keep.sum())
        for p in group.producers + group.norms:
            live.setdefault(p, [None, None])[1] = n
        for c in group.consumers:
            live.setdefault(c, [None, None])[0] = n
    assert live == {k: list(v) for k, v in masks.layer_live().items()}
    dense, small = layer_shapes(model), layer_shapes(slim)
    assert set(dense) == set(small)
    for layer, (cin, cout) in dense.items():
        want_in, want_out = live.get(layer, [None, None])
        if isinstance(model.get_submodule(layer), nn.BatchNorm2d):
            want_in = want_out
        assert small[layer] == (cin if want_in is None else want_in, cout if want_out is None else want_out), layer
    assert small["conv1"][0] == 3 and small["fc"][1] == 10
    assert small["fc"][0] == 1
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_prune_refuses_last_channel_and_double_prune():
    model = make("resnet20")
    masks = ChannelMasks(model, groups_of(model))
    with pytest.raises(ValueError, match="leave none"):
        masks.prune({0: torch.arange(masks.groups[0].size)})
    masks.prune({0: torch.arange(1, masks.groups[0].size)})
    with pytest.raises(ValueError, match="leave none"):
        masks.prune({0: torch.tensor([0])})
    with pytest.raises(ValueError, match="already pruned"):
        masks.prune({0: torch.tensor([1])})
    # a decaying channel counts as gone, too
    masks.prune({1: torch.arange(1, masks.groups[1].size)}, steps=3)
    with pytest.raises(ValueError, match="leave none"):
        masks.prune({1: torch.tensor([0])})
    with pytest.raises(CompressionError, match="decayed"):
        compress(model, masks, torch.randn(CIFAR))


def test_compress_detects_a_model_that_differs():
    """The equivalence check is real: masks that zero only the producer filters (not the BN shift nor the
    consumer's input slice) leave the pruned channel carrying BN's bias through ReLU, which compression removes."""
    model = make("resnet20")
    groups = groups_of(model)
    gi = next(i for i, g in enumerate(groups) if g.kind == "internal")
    leaky = [dataclasses.replace(g, slices=[s for s in g.slices if s.module_name in g.producers]) if i == gi else g
             for i, g in enumerate(groups)]
    masks = ChannelMasks(model, leaky)
    masks.prune({gi: torch.tensor([0, 1, 2])})
    with pytest.raises(CompressionError, match="differs"):
        compress(model, masks, torch.randn(CIFAR))
    # the same channels with the complete group compress fine
    masks = ChannelMasks(model, groups)
    masks.prune({gi: torch.tensor([0, 1, 2])})
    assert compress(model, masks, torch.randn(CIFAR)).compression_check <= 1e-5


# ---------------------------------------------------------------------------------- 3. masks stay zero
def member_tensors(model, group):
    return [(getattr(model.get_submodule(s.module_name), s.tensor_name), s) for s in group.slices]


def train_masked(model, masks, opt, steps, enforce_optimizer=True, seed=0, check_after_step=None):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        masks.enforce_grads()
        opt.step()
        if check_after_step is not None:
            check_after_step()
        masks.enforce_weights()
        if enforce_optimizer:
            masks.enforce_optimizer(opt)


def pruned_setup(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet20", 10)
    groups = channel_groups(model, torch.randn(1, 3, 16, 16))
    masks = ChannelMasks(model, groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train_masked(model, masks, opt, 3)  # dense steps first: every momentum buffer is non-zero
    g = torch.Generator().manual_seed(1)
    chosen = [0, 1, 4, 5, len(groups) - 1]  # stage-1 stream, internal groups, the stream feeding fc
    selection = {gi: torch.randperm(groups[gi].size, generator=g)[: groups[gi].size // 2] for gi in chosen}
    return model, groups, masks, opt, selection


def dead_values(tensor, s, dead):
    return tensor.detach().index_select(s.dim, s.index[dead])


def test_masks_stay_exactly_zero_with_momentum_and_weight_decay():
    model, groups, masks, opt, selection = pruned_setup()
    masks.prune(selection)
    masks.enforce_optimizer(opt)  # what the method does right after a stage
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def all_dead_zero(what="weights"):
        for gi, dead in selection.items():
            for tensor, s in member_tensors(model, groups[gi]):
                values = dead_values(tensor if what == "weights" else opt.state[tensor]["momentum_buffer"], s, dead)
                assert torch.count_nonzero(values) == 0, (what, s.module_name, s.tensor_name)

    all_dead_zero("weights"), all_dead_zero("momentum")
    # with clean gradients and momentum, not even the raw optimizer step moves a pruned entry
    train_masked(model, masks, opt, 50, seed=2, check_after_step=all_dead_zero)
    all_dead_zero("weights"), all_dead_zero("momentum")

    # the unpruned entries trained
    for gi, dead in selection.items():
        keep = torch.ones(groups[gi].size, dtype=torch.bool)
        keep[dead] = False
        live = keep.nonzero().flatten()
        for tensor, s in member_tensors(model, groups[gi]):
            name = f"{s.module_name}.{s.tensor_name}"
            now = tensor.detach().index_select(s.dim, s.index[live])
            was = start[name].index_select(s.dim, s.index[live])
            assert not torch.equal(now, was), name
    # untouched groups are not masked at all
    untouched = [gi for gi in range(len(groups)) if gi not in selection]
    assert all(bool(masks.keep[gi].all()) for gi in untouched)


def test_without_enforce_optimizer_momentum_leaks():
    """The defect ``enforce_optimizer`` prevents: zeroing only the weights leaves momentum in pruned slices,
    which the next step writes back into the weights."""
    model, groups, masks, opt, selection = pruned_setup()
    masks.prune(selection)  # zeroes weights, but not the momentum accumulated by the dense steps
    leaked = []

    def record():
        leaked.append(sum(int(torch.count_nonzero(dead_values(t, s, dead)))
                          for gi, dead in selection.items() for t, s in member_tensors(model, groups[gi])))

    train_masked(model, masks, opt, 5, enforce_optimizer=False, seed=2, check_after_step=record)
    assert leaked[0] > 0  # the step moved pruned weights off zero (enforce_weights hides it afterwards)
    momentum = sum(int(torch.count_nonzero(dead_values(opt.state[t]["momentum_buffer"], s, dead)))
                   for gi, dead in selection.items() for t, s in member_tensors(model, groups[gi]))
    assert momentum > 0
    masks.enforce_optimizer(opt)
    momentum = sum(int(torch.count_nonzero(dead_values(opt.state[t]["momentum_buffer"], s, dead)))
                   for gi, dead in selection.items() for t, s in member_tensors(model, groups[gi]))
    assert momentum == 0


# --------------------------------------------------------------------------------- 4. progressive zeroing
def test_progressive_zeroing_telescopes_to_exact_zero():
    model = make("resnet20")
    groups = groups_of(model)
    masks = ChannelMasks(model, groups)
    gi = next(i for i, g in enumerate(groups) if g.kind == "residual")
    other = next(i for i, g in enumerate(groups) if g.kind == "internal" and g.size == 64)  # shares no tensor
    assert not {s.module_name for s in groups[gi].slices} & {s.module_name for s in groups[other].slices}
    sel = torch.tensor([0, 3, 5, 9])
    T = 5
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    masks.prune({gi: sel}, steps=T)
    masks.prune({other: torch.tensor([2])})  # a hard-pruned channel elsewhere stays zero meanwhile
    assert bool(masks.keep[gi].all()) and not bool(masks.live(gi)[sel].any())
    assert masks.num_live() == masks.num_channels() - len(sel) - 1
    unselected = torch.ones(groups[gi].size, dtype=torch.bool)
    unselected[sel] = False
    for k in range(1, T + 1):
        masks.step_decay()
        masks.enforce_weights()
        for s in groups[gi].slices:
            name = f"{s.module_name}.{s.tensor_name}"
            now = model.state_dict()[name]
            expected = w0[name].index_select(s.dim, s.index[sel]) * (T - k) / T
            got = now.index_select(s.dim, s.index[sel])
            if k < T:
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (k, name)
                assert len(masks.decays) == 1 and masks.decays[0].done == k
            else:
                assert torch.count_nonzero(got) == 0, name
            rest = now.index_select(s.dim, s.index[unselected.nonzero().flatten()])
            base = w0[name].index_select(s.dim, s.index[unselected.nonzero().flatten()])
            assert torch.equal(rest, base), name
    assert masks.decays == []
    assert masks.keep[gi][sel].tolist() == [False] * len(sel)
    assert int(masks.keep[gi].sum()) == groups[gi].size - len(sel)
    masks.step_decay()  # no-op now
    for s in groups[gi].slices:
        assert torch.count_nonzero(dead_values(getattr(model.get_submodule(s.module_name), s.tensor_name), s, sel)) == 0


# ----------------------------------------------------------------------------------------------- 5. cost
def resnet32_dense_macs(num_classes=10, size=32) -> int:
    s1, s2, s3 = size, size // 2, size // 4
    macs = 3 * 16 * 9 * s1 * s1  # stem
    macs += 5 * 2 * 16 * 16 * 9 * s1 * s1  # stage 1: five blocks of two 3x3 16->16 convs
    macs += (16 * 32 * 9 + 32 * 32 * 9 + 16 * 32) * s2 * s2  # stage 2, block 0: conv1, conv2, 1x1 projection
    macs += 4 * 2 * 32 * 32 * 9 * s2 * s2  # stage 2, blocks 1-4
    macs += (32 * 64 * 9 + 64 * 64 * 9 + 32 * 64) * s3 * s3
    macs += 4 * 2 * 64 * 64 * 9 * s3 * s3
    macs += 64 * num_classes  # fc
    return macs


def resnet32_dense_params(num_classes=10) -> int:
    convs = 3 * 16 * 9 + 10 * 16 * 16 * 9
    convs += 16 * 32 * 9 + 9 * 32 * 32 * 9 + 16 * 32
    convs += 32 * 64 * 9 + 9 * 64 * 64 * 9 + 32 * 64
    bns = 2 * (16 + 10 * 16 + 11 * 32 + 11 * 64)  # stem BN, 10 per stage, plus projection BN in stages 2, 3
    return convs + bns + 64 * num_classes + num_classes


def test_dense_resnet32_cost_by_hand():
    model = make("resnet32")
    x = torch.randn(CIFAR)
    c = cost(model, x)
    assert c["macs"] == resnet32_dense_macs() == 69_124_736  # the well-known ~69 M MACs of ResNet-32
    assert c["flops"] == 2 * c["macs"]
    assert c["params"] == resnet32_dense_params() == 466_906 == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == c["flops"]
    # batch size does not matter: cost is per image
    assert count_macs(model, torch.randn(4, 3, 32, 32)) == c["macs"]


@pytest.mark.parametrize("name,normed,shape", CASES[:2] + [("resnet20", False, CIFAR)],
                         ids=["resnet32", "resnet32-normed", "resnet20"])
def test_mask_aware_cost_equals_compressed_cost(name, normed, shape):
    model = make(name, normed=normed)
    x = torch.randn(shape)
    groups = channel_groups(model, x)
    for seed in (0, 1, 2):
        masks = ChannelMasks(model, groups)
        if seed:
            random_prune(masks, seed=seed, single=seed * 3)
        predicted = cost(model, x, masks)
        slim = compress(model, masks, x)
        measured = cost(slim, x)
        assert predicted == measured
        assert predicted["params"] == sum(p.numel() for p in slim.parameters())
        assert count_params(model, masks) == predicted["params"]
        with FlopCounterMode(display=False) as counter:
            slim(x)
        assert counter.get_total_flops() == 2 * predicted["macs"] == predicted["flops"]
        if seed:
            assert predicted["params"] < sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- 6. save -> load
@pytest.mark.parametrize("normed", [False, True])
def test_compressed_model_saves_and_loads_without_pickle(tmp_path, monkeypatch, normed):
    model = make("resnet32", normed=normed)
    x = torch.randn(CIFAR)
    masks = ChannelMasks(model, channel_groups(model, x))
    random_prune(masks, seed=4, single=2)
    slim = compress(model, masks, x)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_shape": [3, 32, 32]}
    classes = [f"c{i}" for i in range(10)]
    save_model(slim, tmp_path / "model", preprocess, classes)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["arch.json", "weights.safetensors"]

    arch = json.loads((tmp_path / "model" / "arch.json").read_text())
    shapes = layer_shapes(slim)
    convs_and_heads = {n for n, m in slim.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, NormedLinear))}
    assert set(arch["channels"]) == convs_and_heads
    for layer, (cin, cout) in arch["channels"].items():
        assert (cin, cout) == shapes[layer], layer
    assert arch["model"] == {"name": "resnet32", "num_classes": 10, **({"normed_head": True} if normed else {})}
    assert arch["channels"] != {n: list(v) for n, v in layer_shapes(model).items() if n in convs_and_heads}

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_model must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded = load_model(tmp_path / "model")
    monkeypatch.undo()
    assert not loaded.training
    assert layer_shapes(loaded) == shapes
    assert loaded.classes == classes and loaded.preprocess == preprocess
    slim.eval()
    with torch.no_grad():
        for batch in (torch.randn(4, 3, 32, 32), synthetic_batch()):
            assert torch.equal(loaded(batch), slim(batch))
    for (k, v), (k2, v2) in zip(slim.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


# ------------------------------------------------------------------------------------ 7. mask persistence
def test_mask_state_round_trip_with_decay_in_progress(tmp_path):
    model = make("resnet20")
    groups = groups_of(model)
    masks = ChannelMasks(model, groups)
    random_prune(masks, seed=3)
    masks.prune({5: masks.live(5).nonzero().flatten()[:3]}, steps=4)
    masks.step_decay()
    masks.step_decay()
    torch.save(masks.state_dict(), tmp_path / "masks.pt")
    state = torch.load(tmp_path / "masks.pt", weights_only=True)

    twin_model = make("resnet20")
    twin_model.load_state_dict(model.state_dict())
    twin = ChannelMasks(twin_model, groups_of(twin_model))
    twin.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(masks.keep, twin.keep))
    assert [(d.group, d.channels.tolist(), d.steps, d.done) for d in masks.decays] == \
           [(d.group, d.channels.tolist(), d.steps, d.done) for d in twin.decays] == \
           [(5, state["decays"][0][1].tolist(), 4, 2)]
    assert twin.num_live() == masks.num_live() and twin.layer_live() == masks.layer_live()
    # continuing the decay on both gives the same weights and the same final masks
    for m in (masks, twin):
        m.step_decay(), m.step_decay(), m.enforce_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, twin_model.state_dict()[k]), k
    assert twin.decays == [] and all(torch.equal(a, b) for a, b in zip(masks.keep, twin.keep))
    # the loaded state is a copy, not an alias
    state["keep"][0][:] = False
    assert bool(twin.keep[0].any())


def test_loading_masks_of_other_groups_raises():
    model = make("resnet20")
    masks = ChannelMasks(model, groups_of(model))
    for other in (ChannelMasks(model, groups_of(model, scope="internal")),
                  ChannelMasks(make("resnet32"), groups_of(make("resnet32")))):
        with pytest.raises(ValueError, match="different channel groups"):
            other.load_state_dict(masks.state_dict())


def test_cost_accepts_an_input_size():
    from tailwise.compress.cost import cost
    from tailwise.models import build_model

    model = build_model("resnet20", 10)
    assert cost(model, (3, 32, 32)) == cost(model, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_drop_pruned_entries_lines_up_with_the_compressed_parameters(name):
    """Slicing any same-shaped tensors (momentum buffers) by the masks gives exactly what Torch-Pruning leaves
    of the parameters themselves, entry for entry."""
    from tailwise.compress.slim import drop_pruned_entries

    model = make(name)
    masks = ChannelMasks(model, groups_of(model))
    random_prune(masks, seed=3)
    slim = compress(model, masks, torch.randn(CIFAR))
    sliced = drop_pruned_entries(masks, dict(model.named_parameters()))
    small = dict(slim.named_parameters())
    assert set(sliced) == set(small)
    changed = 0
    for key, value in small.items():
        assert sliced[key].shape == value.shape, key
        assert torch.equal(sliced[key], value), key
        changed += sliced[key].shape != dict(model.named_parameters())[key].shape
    assert changed > 10
