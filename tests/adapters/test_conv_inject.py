import pytest
import torch
from torch import nn

from mmadapt.adapters import adapters_of, disable_adapters, inject
from mmadapt.errors import InputError


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 4, 3, groups=2, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_inject_adapts_convs_for_flora_tucker_only():
    torch.manual_seed(0)
    model = Encoder()
    x = torch.randn(2, 6, 5, 5)
    base = model(x)
    placed = inject(model, [{"type": "flora_tucker", "modalities": ["text"], "targets": ["conv", "fc"], "r": 2}])
    assert placed == {"flora_tucker": ["conv", "fc"]}
    assert torch.equal(model(x), base)
    adapters = dict(adapters_of(model))
    for adapter in adapters.values():
        nn.init.normal_(adapter.core)
    conv_adapter = adapters["conv.mmadapt.flora_tucker"]
    adapted = model(x)
    weight = model.conv.weight + conv_adapter.delta_weight()
    conv_out = nn.functional.conv2d(x, weight, model.conv.bias, padding=1, groups=2)
    fc_weight = model.fc.weight + adapters["fc.mmadapt.flora_tucker"].delta_weight()
    torch.testing.assert_close(adapted, nn.functional.linear(conv_out.mean((2, 3)), fc_weight, model.fc.bias))
    with disable_adapters(model):
        assert torch.equal(model(x), base)
    conv_adapter.merge()
    torch.testing.assert_close(model(x), adapted)
    with pytest.raises(InputError, match="match no linear layer"):
        inject(Encoder(), [{"type": "plora", "targets": ["conv"]}])
    with pytest.raises(InputError, match="match no linear or conv layer"):
        inject(Encoder(), [{"type": "flora_tucker", "targets": ["nothing"]}])
