"""ME-CondConv: the conv it came from at init, the per-sample mixed kernel after, and its conversion."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genfast.assembly.condconv import MECondConv, convert_to_condconv

CONFIGS = {
    "3x3": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    "stride2": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1),
    "groups": dict(in_channels=8, out_channels=16, kernel_size=3, padding=2, dilation=2, groups=4),
    "no_bias_1x1": dict(in_channels=6, out_channels=10, kernel_size=1, bias=False),
    "reflect": dict(in_channels=4, out_channels=4, kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"),
    "same": dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"),
}


def _conv(name, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(**CONFIGS[name])


def _reference(layer: MECondConv, x):
    """Sample by sample: W_i = W0 + sum_k g_k a_ik E_k, one plain F.conv2d each."""
    outs = []
    for sample in x:
        a = torch.sigmoid(layer.router(sample.mean(dim=(1, 2))))
        weight = layer.weight + ((layer.gates * a)[:, None, None, None, None] * layer.experts).sum(0)
        sample = sample[None]
        padding = layer.padding
        if layer.padding_mode != "zeros":
            sample, padding = F.pad(sample, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
        outs.append(F.conv2d(sample, weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize("name", CONFIGS)
def test_equals_the_conv_it_came_from_at_init(name, one_thread):
    conv = _conv(name)
    x = torch.randn(3, conv.in_channels, 9, 11)
    inherited = [torch.randn_like(conv.weight)]
    layer = MECondConv.from_conv(conv, inherited, num_experts=3)
    assert layer.experts.shape == (3, *conv.weight.shape)
    assert torch.equal(layer.experts[0], inherited[0])
    with torch.no_grad():
        expected = conv(x)
        assert torch.equal(layer(x), expected)
    layer.gates.requires_grad_(False)  # frozen gates: no gradient needed, the plain conv path too
    assert torch.equal(layer(x), conv(x))
    layer.gates.requires_grad_(True)  # gates being trained: the mixed path, same numbers up to rounding
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_nonzero_gates_mix_a_kernel_per_sample(name, one_thread):
    conv = _conv(name, seed=1)
    layer = MECondConv.from_conv(conv, [torch.randn_like(conv.weight) * 0.1], num_experts=2)
    with torch.no_grad():
        layer.gates.copy_(torch.tensor([0.7, -1.3]))
        layer.router.weight.normal_()  # routing that differs clearly between samples
    x = torch.randn(4, conv.in_channels, 10, 8) + torch.linspace(-1, 1, 4)[:, None, None, None]
    got = layer(x)
    torch.testing.assert_close(got, _reference(layer, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, conv(x), atol=1e-3), "nonzero gates change the output"
    routing = layer.routing(x)
    assert (routing.max(0).values - routing.min(0).values).max() > 0.05, "samples get different mixtures"


def test_gates_get_gradients_at_init(one_thread):
    conv = _conv("3x3")
    layer = MECondConv.from_conv(conv, [torch.randn_like(conv.weight)], num_experts=2)
    x = torch.randn(2, 8, 7, 7)
    (layer(x) * torch.randn(2, 12, 7, 7)).sum().backward()
    assert layer.gates.grad is not None and (layer.gates.grad != 0).all()
    assert layer.weight.grad is not None


def test_trained_layer_leaves_source_conv_alone_and_follows_to(one_thread):
    conv = _conv("groups")
    before = conv.weight.detach().clone()
    layer = MECondConv.from_conv(conv, num_experts=2)
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.gates.fill_(0.5)
    assert torch.equal(conv.weight, before)
    layer = layer.to(torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _reference(layer, x))


def test_state_dict_round_trip_into_a_fresh_layer(one_thread):
    """What a saved student does on load: a layer rebuilt with fresh experts takes the saved weights."""
    layer = MECondConv.from_conv(_conv("stride2"), num_experts=3)
    with torch.no_grad():
        layer.gates.normal_()
    rebuilt = MECondConv.from_conv(_conv("stride2", seed=5), num_experts=3)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(rebuilt(x), layer(x))
    assert sorted(layer.state_dict()) == ["bias", "experts", "gates", "router.bias", "router.weight", "weight"]


def test_convert_to_condconv_replaces_named_convs(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        before = model(x)
        kernel = torch.randn(8, 8, 3, 3)
        names = convert_to_condconv(model, {"2.0": [kernel], "0": []}, num_experts=2)
        assert names == ["2.0", "0"]
        assert isinstance(model[0], MECondConv) and isinstance(model[2][0], MECondConv)
        assert torch.equal(model[2][0].experts[0], kernel)
        assert torch.equal(model(x), before)


def test_errors_name_the_problem():
    conv = _conv("3x3")
    with pytest.raises(ValueError, match="shape"):
        MECondConv.from_conv(conv, [torch.randn(12, 8, 1, 1)], num_experts=2)
    with pytest.raises(ValueError, match="num_experts"):
        MECondConv.from_conv(conv, [torch.randn_like(conv.weight)] * 3, num_experts=2)
    with pytest.raises(ValueError, match="num_experts"):
        MECondConv.from_conv(conv)  # no experts and no count
    with pytest.raises(TypeError, match="already"):
        MECondConv.from_conv(MECondConv.from_conv(conv, num_experts=1), num_experts=1)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.SiLU())
    with pytest.raises(ValueError, match="no submodule"):
        convert_to_condconv(model, {"0": [], "5": []}, num_experts=1)
    with pytest.raises(TypeError, match="not a plain nn.Conv2d"):
        convert_to_condconv(model, {"1": []}, num_experts=1)
    with pytest.raises(ValueError, match="shape"):
        convert_to_condconv(model, {"0": [torch.randn(1, 1, 1, 1)]}, num_experts=1)
    assert type(model[0]) is nn.Conv2d, "a failed conversion changes nothing"
    with pytest.raises(ValueError, match="num_experts"):
        convert_to_condconv(model, {"0": []}, num_experts=0)
