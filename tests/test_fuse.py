import timm
import torch
from torch import nn

from transferkit.models.fuse import fold_batchnorm


def _randomize_bn(model):
    for m in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_folded_backbones_match_and_lose_their_batchnorms():
    for name in ("tf_efficientnet_lite0", "resnet18"):
        model = _randomize_bn(timm.create_model(name, pretrained=False, num_classes=0))
        x = torch.randn(3, 3, 64, 64)
        fused = fold_batchnorm(model, x[:2])
        assert fused is not model
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), name
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


class _BnBeforeConv(nn.Module):
    """Registered conv-then-BN, but runs BN first: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_a_fold_that_changes_the_output_is_refused():
    model = _randomize_bn(_BnBeforeConv())
    assert fold_batchnorm(model, torch.randn(2, 4, 8, 8)) is model
