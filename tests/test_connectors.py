"""Connectors: output shape [N, num_tokens, out_dim] for every name and token count, gradients, and clear errors."""

from __future__ import annotations

import pytest
import torch

from visprior.models.connectors import CONNECTORS, ConnectorSpec, build_connector

IN_DIM, OUT_DIM, PATCHES = 32, 48, 16  # a 4 x 4 patch grid

SUPPORTED = {
    "linear": [None, 16, 4, 1],
    "mlp2x_gelu": [None, 16, 4],
    "avg_pool": [None, 9, 4, 1],
    "attention_pool": [None, 3, 4, 32],
    "c_abstractor": [None, 9, 4],
}


def test_registry_names() -> None:
    assert set(CONNECTORS) == set(SUPPORTED)


@pytest.mark.parametrize(("name", "num_tokens"), [(n, k) for n, ks in SUPPORTED.items() for k in ks])
def test_output_shape_and_gradients(name: str, num_tokens: int | None) -> None:
    options = {"depth": 1} if name == "c_abstractor" else {}
    connector = build_connector(ConnectorSpec(name, num_tokens, options), IN_DIM, OUT_DIM, PATCHES)
    features = torch.randn(2, PATCHES, IN_DIM, requires_grad=True)
    out = connector(features)
    expected_tokens = num_tokens or PATCHES
    assert connector.num_tokens == expected_tokens
    assert out.shape == (2, expected_tokens, OUT_DIM)
    out.square().mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in connector.parameters())


def test_images_do_not_mix() -> None:
    connector = build_connector(ConnectorSpec("c_abstractor", 4, {"depth": 1}), IN_DIM, OUT_DIM, PATCHES).eval()
    a, b = torch.randn(1, PATCHES, IN_DIM), torch.randn(1, PATCHES, IN_DIM)
    torch.testing.assert_close(connector(torch.cat([a, b]))[1:], connector(b))


def test_space_to_depth_merges_neighbouring_patches() -> None:
    connector = build_connector(ConnectorSpec("linear", 4), 1, 4, PATCHES)
    with torch.no_grad():
        connector.proj.weight.copy_(torch.eye(4))
        connector.proj.bias.zero_()
    grid = torch.arange(16.0).view(1, 16, 1)  # patch (row, col) has value 4 * row + col
    out = connector(grid)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 1, 4, 5]))  # top-left 2 x 2 block
    torch.testing.assert_close(out[0, 3], torch.tensor([10.0, 11, 14, 15]))  # bottom-right block


def test_avg_pool_averages_quadrants() -> None:
    connector = build_connector(ConnectorSpec("avg_pool", 4, {"projector": "linear"}), 1, 1, PATCHES)
    with torch.no_grad():
        connector.proj.weight.fill_(1.0)
        connector.proj.bias.zero_()
    out = connector(torch.arange(16.0).view(1, 16, 1))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


@pytest.mark.parametrize(
    ("spec", "num_patches", "message"),
    [
        (ConnectorSpec("qformer"), PATCHES, "unknown connector 'qformer'"),
        (ConnectorSpec("avg_pool", 5), PATCHES, "num_tokens=5 is not a perfect square"),
        (ConnectorSpec("c_abstractor", 8), PATCHES, "num_tokens=8 is not a perfect square"),
        (ConnectorSpec("avg_pool", 25), PATCHES, "cannot make 25 tokens from 16 patches"),
        (ConnectorSpec("linear", 9), PATCHES, "side dividing the 4x4 patch grid"),
        (ConnectorSpec("mlp2x_gelu", 4), 17, "square patch grid, got 17 patches"),
        (ConnectorSpec("avg_pool", 4), 17, "square patch grid, got 17 patches"),
        (ConnectorSpec("attention_pool", 4, {"num_heads": 5}), PATCHES, "num_heads=5 must divide"),
        (ConnectorSpec("linear", None, {"depth": 2}), PATCHES, r"no option\(s\) \['depth'\]"),
    ],
)
def test_clear_errors(spec: ConnectorSpec, num_patches: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_connector(spec, IN_DIM, OUT_DIM, num_patches)


def test_attention_pool_accepts_cls_token() -> None:
    connector = build_connector(ConnectorSpec("attention_pool", 8), IN_DIM, OUT_DIM, 17)
    assert connector(torch.randn(2, 17, IN_DIM)).shape == (2, 8, OUT_DIM)
