"""U-Net and the model registry (training/models)."""

import pytest
import torch
from torch import nn

from training.models import MODELS, UNet, build_model, register_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("shape", [(32, 32), (37, 50), (9, 70)])
def test_unet_output_shape_any_input_size(norm, shape):
    model = build_model("unet", n_classes=5, depth=2, width=4, norm=norm).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *shape))
    assert out.shape == (2, 5, *shape)


def test_unet_depth_and_width_set_the_size():
    def n_params(**kw):
        return sum(p.numel() for p in UNet(n_classes=3, **kw).parameters())

    assert n_params(depth=2, width=8) < n_params(depth=3, width=8) < n_params(depth=3, width=16)
    assert len(UNet(depth=4).down) == 4


def test_unet_is_fully_convolutional_and_translation_consistent():
    torch.manual_seed(0)
    model = UNet(n_classes=3, depth=2, width=4).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        full = model(x)
        shifted = model(torch.roll(x, shifts=(8, 8), dims=(-2, -1)))
    # away from the borders a shift by a multiple of 2**depth shifts the output
    torch.testing.assert_close(shifted[..., 24:40, 24:40], full[..., 16:32, 16:32])


def test_registry_errors_and_extension():
    with pytest.raises(ValueError, match="unknown name 'segnet'"):
        build_model("segnet")
    with pytest.raises(ValueError, match="unet"):
        build_model("unet", colour=3)
    with pytest.raises(ValueError, match="n_classes"):
        build_model("unet", n_classes=1)

    @register_model("_test_pointwise")
    class Pointwise(nn.Module):
        def __init__(self, in_channels=1, n_classes=2):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, n_classes, 1)

        def forward(self, x):
            return self.conv(x)

    try:
        assert isinstance(build_model("_test_pointwise", n_classes=3), Pointwise)
    finally:
        MODELS.pop("_test_pointwise")


def test_fused_for_inference_gives_the_same_logits_and_leaves_the_model_alone():
    from training.models import fused_for_inference

    torch.manual_seed(1)
    model = UNet(n_classes=4, depth=2, width=4)
    model.train()
    for _ in range(3):  # running statistics away from (0, 1)
        model(3.0 * torch.randn(2, 1, 32, 32) + 1.0)
    model.eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 1, 40, 48)
    fused = fused_for_inference(model)
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a model still training is copied as it is (its batch norms use batch statistics)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused_for_inference(model.train()).modules())


def test_fused_for_inference_handles_batch_norms_without_affine_parameters():
    from training.models import fused_for_inference

    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False))
    net.train()
    net(torch.randn(4, 1, 16, 16) * 2 + 1)
    net.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused_for_inference(net)(x), net(x), rtol=1e-4, atol=1e-5)
