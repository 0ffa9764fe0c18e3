"""make_backbone against torchvision's ResNet (same weights from one seed, same state dict, same
outputs), common.Conv2d's cut kernels and matrix products against the full convolution in
float64 (outputs and both gradients), and common.py importing without torchvision."""
import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import common


def torchvision_resnet(arch):
    if arch == 'resnet10':  # ResNet-18's blocks, one per stage
        return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock,
                                                [1, 1, 1, 1], zero_init_residual=True)
    return getattr(torchvision.models, arch)(zero_init_residual=True)


@pytest.mark.parametrize('arch', ['resnet10', 'resnet18', 'resnet34', 'resnet50'])
def test_backbone_is_torchvisions(arch):
    """make_backbone: torchvision's ResNet (the same weights from one seed, the same state dict)
    whose convolutions compute only what reads the input: the same outputs as the plain model
    in float64, training and eval mode, at 32 px (2x2 and 1x1 maps in the last two stages:
    the matrix-product path; batch 4) and 64 px (2x2 maps in the last stage; batch 2, which
    still gives its BatchNorm layers 8 values a channel, at half the cost)."""
    torch.manual_seed(3)
    ref = torchvision_resnet(arch)
    ref.fc = torch.nn.Identity()
    torch.manual_seed(3)
    own, width = common.make_backbone(arch)
    assert width == common.ARCHS[arch]
    a, b = ref.state_dict(), own.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sum(type(m) is common.Conv2d for m in own.modules()) == \
        sum(type(m) is torch.nn.Conv2d for m in ref.modules()) > 0
    with torch.no_grad():  # non-trivial weights: zero-initialised residual BN hides the blocks
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    own.load_state_dict(ref.state_dict())
    ref, own = ref.double(), own.double()
    for size, batch in ((32, 4), (64, 2)):
        x = torch.randn(batch, 3, size, size, dtype=torch.float64)
        for train in (True, False):
            ref.train(train), own.train(train)
            torch.testing.assert_close(own(x), ref(x), rtol=1e-10, atol=1e-10)


def test_named_torchvision_urls_are_torchvisions():
    w = torchvision.models
    assert common.NAMED_WEIGHTS['torchvision', 'resnet50'] == w.ResNet50_Weights.IMAGENET1K_V2.url
    assert common.NAMED_WEIGHTS['torchvision', 'resnet34'] == w.ResNet34_Weights.IMAGENET1K_V1.url
    assert common.NAMED_WEIGHTS['torchvision', 'resnet18'] == w.ResNet18_Weights.IMAGENET1K_V1.url


def test_cut_taps_by_hand():
    # a 3x3 convolution with padding 1 on one pixel reads only its centre tap
    assert common._live_taps(1, 3, 1, 1, 1) == (1, 1, 0, 0)
    # stride 2 on two pixels: one output, reading inputs 0 and 1 through taps 1 and 2
    assert common._live_taps(2, 3, 2, 1, 1) == (1, 2, 0, 0)
    # 7x7 stride 2 padding 3 on 2 pixels: one output, reading the inputs through taps 3, 4
    assert common._live_taps(2, 7, 2, 3, 1) == (3, 4, 0, 0)
    # on 4 pixels: output 0 reads taps 3-6, output 1 taps 1-4; the cut kernel (taps 1-6)
    # needs 2 zeros on each side where the full one had 3
    assert common._live_taps(4, 7, 2, 3, 1) == (1, 6, 2, 2)
    assert common._live_taps(8, 3, 1, 1, 1) == (0, 2, 1, 1)  # every tap: nothing is cut


CASES = [(n, k, s, p, d) for n, k, s, p, d in itertools.product(
    (1, 2, 3, 5), (1, 2, 3, 5, 7), (1, 2, 3), (0, 1, 2, 3), (1, 2))
    if n + 2 * p >= d * (k - 1) + 1]


def test_conv2d_equals_the_full_convolution_float64():
    """Every small geometry, H and W different, groups and bias: outputs, input and weight
    gradients as F.conv2d's (the cut taps' weight gradient is zero)."""
    g = torch.Generator().manual_seed(0)
    cut = 0
    for i, (n, k, s, p, d) in enumerate(CASES):
        m = n + 1 if n < 5 else n  # a different width
        groups = 2 if i % 3 == 0 else 1
        conv = common.Conv2d(4, 6, k, s, p, d, groups=groups, bias=i % 2 == 0).double()
        x = torch.randn(2, 4, n, m, dtype=torch.float64, generator=g, requires_grad=True)
        if m + 2 * p < d * (k - 1) + 1:
            continue
        y = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias, s, p, d, groups)
        assert y.shape == ref.shape, (n, k, s, p, d)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
        params = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
        got = torch.autograd.grad(y, params, gy)
        want = torch.autograd.grad(ref, params, gy)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        matmul = n * m <= common.MATMUL_PIXELS and groups == 1
        cut += not matmul and common._live_taps(n, k, s, p, d)[:2] != (0, k - 1)
    assert cut > 50  # the cases do exercise the cut path


def test_matmul_conv_equals_the_full_convolution_float64(monkeypatch):
    """Every geometry of a map of at most MATMUL_PIXELS pixels (1x1 to 4x1, strides, padding,
    dilation, kernels larger than the map, bias) goes through the matrix product and gives
    F.conv2d's output and gradients, channels-last input included; groups fall back."""
    calls = []
    real = common._matmul_conv
    monkeypatch.setattr(common, '_matmul_conv', lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    cases = 0
    for h, w, k, s, p, d in itertools.product((1, 2, 4), (1, 2), (1, 2, 3, 5), (1, 2),
                                              (0, 1, 2), (1, 2)):
        if h * w > common.MATMUL_PIXELS or min(h, w) + 2 * p < d * (k - 1) + 1:
            continue
        conv = common.Conv2d(3, 5, k, s, p, d, bias=cases % 2 == 0).double()
        x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=g)
        if cases % 3 == 0:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y, ref = conv(x), F.conv2d(x, conv.weight, conv.bias, s, p, d)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
        params = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
        for a, b in zip((y, *torch.autograd.grad(y, params, gy)),
                        (ref, *torch.autograd.grad(ref, params, gy))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        cases += 1
    assert cases > 100 and len(calls) == cases
    grouped = common.Conv2d(4, 4, 3, 1, 1, groups=2)
    grouped(torch.randn(1, 4, 2, 2))
    assert len(calls) == cases  # groups take oneDNN's path


def test_conv2d_channels_last_and_float32():
    conv = common.Conv2d(16, 8, 3, 1, 1, bias=False)
    x = torch.randn(4, 16, 1, 1).contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, conv.weight, None, 1, 1)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_conv2d_under_autocast_gives_conv2ds_dtype():
    """On the matrix-product path (a map of at most MATMUL_PIXELS) with a bias, the output
    under bf16 autocast is bf16 as F.conv2d's, not promoted to fp32 by the bias."""
    torch.manual_seed(0)
    conv = common.Conv2d(8, 6, 3, 1, 1, bias=True)
    x = torch.randn(2, 8, 2, 2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, ref = conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_common_imports_without_torchvision():
    """torchvision (4.4 s of imports on a 2-core machine) comes in with the first backbone."""
    code = ('import sys, common; print("torchvision" in sys.modules); '
            'common.make_backbone("resnet18"); print("torchvision" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=common.__file__.rsplit('/', 1)[0], check=True).stdout
    assert out.split() == ['False', 'True']
