"""The parameter-dict vector helpers against torch's ops on the flattened vector."""

from __future__ import annotations

import pytest
import torch

from lightning_bn.diagnostics.paramvec import (
    FlatLayout,
    dict_axpy,
    dict_clone,
    dict_dot,
    dict_flat,
    dict_norm,
    dict_normalise,
    dict_sub_,
    vector_change,
)


def _dicts(dtype: torch.dtype = torch.float64) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 2, 3), "scalar": ()}
    x = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    y = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    return x, y


def _flat(d: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def test_dot_and_norm_match_the_flat_vector() -> None:
    x, y = _dicts()
    torch.testing.assert_close(dict_dot(x, y), torch.dot(_flat(x), _flat(y)))
    torch.testing.assert_close(dict_norm(x), torch.linalg.vector_norm(_flat(x)))
    # accumulation dtype: float32 tensors, float64 result, same value to float32 rounding
    x32 = {k: t.float() for k, t in x.items()}
    norm64 = dict_norm(x32, dtype=torch.float64)
    assert norm64.dtype == torch.float64
    assert float(norm64) == pytest.approx(float(torch.linalg.vector_norm(_flat(x))), rel=1e-6)
    dot64 = dict_dot(x32, {k: t.float() for k, t in y.items()}, dtype=torch.float64)
    assert dot64.dtype == torch.float64
    assert float(dot64) == pytest.approx(float(torch.dot(_flat(x), _flat(y))), rel=1e-5)


def test_elementwise_helpers_match_the_flat_vector() -> None:
    x, y = _dicts()
    flat_x, flat_y = _flat(x).clone(), _flat(y).clone()
    torch.testing.assert_close(_flat(dict_axpy(-0.7, x, y)), flat_y - 0.7 * flat_x)
    unit = dict_normalise(x)
    torch.testing.assert_close(_flat(unit), flat_x / torch.linalg.vector_norm(flat_x))
    # the non-inplace helpers left their inputs alone
    torch.testing.assert_close(_flat(x), flat_x)
    torch.testing.assert_close(_flat(y), flat_y)
    # in place: returns the same dict, its tensors now hold x - y
    out = dict_sub_(x, y)
    assert out is x
    torch.testing.assert_close(_flat(x), flat_x - flat_y)
    clone = dict_clone(y)
    assert all(clone[k].data_ptr() != y[k].data_ptr() for k in y)
    torch.testing.assert_close(_flat(clone), flat_y)


def test_half_precision_norm_does_not_overflow() -> None:
    # 400 entries of 30 in float16: the sum of squares (360000) overflows float16 (max 65504)
    half = {
        "a": torch.full((200,), 30.0, dtype=torch.float16),
        "b": torch.full((200,), 30.0).half(),
    }
    assert float(dict_norm(half)) == pytest.approx(600.0, rel=1e-3)


def test_key_mismatch_and_zero_norm_raise() -> None:
    x, y = _dicts()
    y.pop("scalar")
    for fn in (dict_dot, dict_sub_):
        with pytest.raises(ValueError, match="same keys"):
            fn(x, y)
    with pytest.raises(ValueError, match="same keys"):
        dict_axpy(1.0, x, y)
    with pytest.raises(ValueError, match="norm 0"):
        dict_normalise({k: torch.zeros_like(t) for k, t in x.items()})
    assert float(dict_norm({})) == 0.0 and float(dict_dot({}, {})) == 0.0


def test_flat_layout_round_trip_with_mixed_dtypes() -> None:
    x, _ = _dicts(torch.float32)
    x["a.bias"] = x["a.bias"].double()  # one wider tensor: the working dtype becomes float64
    layout = FlatLayout(x)
    flat = layout.flat(x)
    assert flat.dtype == torch.float64 and flat.shape == (layout.numel,)
    torch.testing.assert_close(flat, _flat({k: t.double() for k, t in x.items()}))
    back = layout.unflat(flat)
    assert list(back) == list(x)
    for k in x:
        assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape
        torch.testing.assert_close(back[k], x[k])
    # same dtype everywhere: unflat returns views of the flat vector
    same = FlatLayout({k: t.double() for k, t in x.items()})
    v = torch.arange(same.numel, dtype=torch.float64)
    views = same.unflat(v)
    v.zero_()
    assert all(bool((t == 0).all()) for t in views.values())
    with pytest.raises(ValueError, match="keys"):
        layout.flat({"a.bias": x["a.bias"]})


def test_dict_flat_and_vector_change_against_the_closed_form() -> None:
    x, y = _dicts(torch.float32)
    flat = dict_flat(x, dtype=torch.float64)
    assert flat.dtype == torch.float64
    assert torch.equal(flat, _flat(x).double())
    assert torch.equal(
        dict_flat(x, keys=["b.weight", "a.bias"]),
        torch.cat([x["b.weight"].reshape(-1), x["a.bias"]]),
    )
    g, gp = _flat(x).double(), _flat(y).double()
    l2, cos, rel = vector_change(g, gp)
    dist = sum((a - b) ** 2 for a, b in zip(g.tolist(), gp.tolist(), strict=True)) ** 0.5
    ng = sum(a * a for a in g.tolist()) ** 0.5
    ngp = sum(b * b for b in gp.tolist()) ** 0.5
    dot = sum(a * b for a, b in zip(g.tolist(), gp.tolist(), strict=True))
    assert float(l2) == pytest.approx(dist, rel=1e-12)
    assert float(cos) == pytest.approx(dot / (ng * ngp), rel=1e-12)
    assert float(rel) == pytest.approx(dist / ng, rel=1e-12)
    # equal vectors: cosine exactly 1 (clamped), no change; a zero G: no division by zero
    assert [float(v) for v in vector_change(g, g)] == [0.0, 1.0, 0.0]
    zero = torch.zeros_like(g)
    l2, cos, rel = vector_change(zero, gp)
    assert float(cos) == 0.0 and float(rel) == pytest.approx(float(l2) / 1e-12)
