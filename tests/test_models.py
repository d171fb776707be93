import json
import math

import pytest
import torch
from torch import nn

from tailwise.models import NormedLinear, build_model, list_models, register_model, registry
from tailwise.models.cifar_resnet import BasicBlock

CIFAR = {"resnet20": 3, "resnet32": 5, "resnet56": 9}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def cifar_param_formula(n, num_classes):
    """Independent count: 3x3 conv = 9*cin*cout (no bias), BN = 2*c, projection = 1x1 conv + BN, fc = (64+1)*C."""
    total = 9 * 3 * 16 + 2 * 16  # stem conv + BN
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += 9 * cin * width + 2 * width  # conv1 + bn1
            total += 9 * width * width + 2 * width  # conv2 + bn2
            if cin != width:
                total += cin * width + 2 * width  # projection 1x1 conv + BN
            cin = width
    return total + (64 + 1) * num_classes


def test_registry_lists_all():
    assert {"resnet20", "resnet32", "resnet56", "resnet18", "resnet50"} <= set(list_models())


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_output_shape(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_output_shape(name):
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("name,n", sorted(CIFAR.items()))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_param_count(name, n, num_classes):
    assert n_params(build_model(name, num_classes)) == cifar_param_formula(n, num_classes)


def test_resnet20_param_count_literal():
    # 269,722 is the well-known option-A ResNet-20 (CIFAR-10); option B adds two 1x1 projections + BN:
    # (16*32 + 2*32) + (32*64 + 2*64) = 2752.
    assert n_params(build_model("resnet20", 10)) == 269_722 + 2_752


@pytest.mark.parametrize("name,n", sorted(CIFAR.items()))
def test_cifar_depth(name, n):
    model = build_model(name, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv3 = [m for m in convs if m.kernel_size == (3, 3)]
    conv1 = [m for m in convs if m.kernel_size == (1, 1)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(conv3) + len(linears) == 6 * n + 2  # stem + 2 convs per block * 3n blocks + fc
    assert len(conv1) == 2  # the two projection shortcuts
    assert all(m.bias is None for m in convs)


@pytest.mark.parametrize("name,n", sorted(CIFAR.items()))
def test_projection_only_at_stage_transitions(name, n):
    model = build_model(name, 10)
    for s, layer in enumerate([model.layer1, model.layer2, model.layer3]):
        assert len(layer) == n
        for j, block in enumerate(layer):
            assert isinstance(block, BasicBlock)
            if s > 0 and j == 0:
                assert isinstance(block.shortcut, nn.Sequential)
                conv, bn = block.shortcut
                assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
                assert conv.bias is None and isinstance(bn, nn.BatchNorm2d)
                assert block.conv1.stride == (2, 2)
            else:
                assert isinstance(block.shortcut, nn.Identity)
                assert block.conv1.stride == (1, 1)


def test_cifar_init():
    model = build_model("resnet20", 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model.layer3[1].conv1.weight  # fan_out = 64 * 9, std = sqrt(2 / fan_out)
    assert abs(w.std().item() - math.sqrt(2 / (64 * 9))) < 0.01


def test_normed_linear_cosines():
    torch.manual_seed(0)
    head = NormedLinear(3, 2)
    assert head.weight.shape == (3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 2.0]]))
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, -1.0, 0.0]])
    out = head(x)
    # columns w0 = (1,0,0), w1 = (0,2,2)/|.| = (0,1,1)/sqrt2; rows x0/|x0| = (0.6,0.8,0), x1 = (0,-1,0)
    expected = torch.tensor([[0.6, 0.8 / math.sqrt(2)], [0.0, -1 / math.sqrt(2)]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_normed_linear_range_and_init():
    torch.manual_seed(1)
    head = NormedLinear(64, 10)
    out = head(torch.randn(32, 64) * 100)
    assert out.shape == (32, 10)
    assert out.abs().max() <= 1 + 1e-6
    x = torch.randn(4, 64)
    assert torch.allclose(head(torch.cat([x, x])), head(torch.cat([x, 5 * x])), atol=1e-6)  # scale invariant
    # renorm(2, 1, 1e-5).mul(1e5): every column ends with norm ~1
    assert torch.allclose(head.weight.norm(dim=0), torch.ones(10), atol=1e-3)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_normed_head(name):
    model = build_model(name, 4, normed_head=True).eval()
    assert isinstance(model.fc, NormedLinear)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4) and out.abs().max() <= 1 + 1e-6


def test_unknown_model_and_bad_num_classes():
    with pytest.raises(ValueError, match="resnet32"):
        build_model("resnet1000", 10)
    with pytest.raises(ValueError):
        build_model("resnet20", 0)


def test_arch_json_roundtrip():
    model = build_model("resnet32", 100, normed_head=True)
    assert model.arch == {"name": "resnet32", "num_classes": 100, "normed_head": True}
    arch = json.loads(json.dumps(model.arch))
    rebuilt = build_model(**arch)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.arch == model.arch
    assert isinstance(rebuilt.fc, NormedLinear)


def test_register_model_decorator():
    @register_model("_tiny_test_model")
    def tiny(num_classes, width=2):
        return nn.Linear(width, num_classes)

    try:
        m = build_model("_tiny_test_model", 3, width=5)
        assert "_tiny_test_model" in list_models()
        assert m.arch == {"name": "_tiny_test_model", "num_classes": 3, "width": 5}
        assert m.weight.shape == (3, 5)
    finally:
        registry.MODELS.unregister("_tiny_test_model")
