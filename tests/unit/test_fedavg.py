import numpy as np
import pytest
import torch

from colnet_mpi.algorithms.fedavg import streamed_average, weighted_average


def test_equal_weights_match_numpy_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 37))
    out = weighted_average(torch.tensor(x))
    np.testing.assert_allclose(out.numpy(), x.mean(axis=0), rtol=1e-12, atol=1e-12)


def test_weighted_mean_matches_numpy_average():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 11))
    w = [3.0, 0.0, 1.5, 10.0]
    out = weighted_average(torch.tensor(x), w)
    np.testing.assert_allclose(out.numpy(), np.average(x, axis=0, weights=w), rtol=1e-12)


def test_integer_sample_counts_and_dtype_device_kept():
    x = torch.randn(3, 8, dtype=torch.float32)
    out = weighted_average(x, [100, 200, 700])
    assert out.dtype == torch.float32 and out.device == x.device and out.shape == (8,)
    expected = 0.1 * x[0] + 0.2 * x[1] + 0.7 * x[2]
    torch.testing.assert_close(out, expected)


def test_single_row_is_identity():
    x = torch.randn(1, 6, dtype=torch.float64)
    torch.testing.assert_close(weighted_average(x), x[0])
    torch.testing.assert_close(weighted_average(x, [2.0]), x[0])


@pytest.mark.parametrize(
    "weights",
    [[1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0], [1.0, float("nan"), 1.0], [1, float("inf"), 1]],
)
def test_bad_weights_raise(weights):
    with pytest.raises(ValueError, match="weights"):
        weighted_average(torch.ones(3, 4), weights)


def test_bad_vectors_raise():
    with pytest.raises(ValueError, match="shape"):
        weighted_average(torch.ones(4))
    with pytest.raises(ValueError, match="at least one row"):
        weighted_average(torch.ones(0, 4))
    with pytest.raises(ValueError, match="floating"):
        weighted_average(torch.ones(2, 4, dtype=torch.int64))


def test_streamed_average_is_the_stacked_average_without_the_stack():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(1000, generator=gen) for _ in range(5)]
    w = [1.0, 0.5, 2.0, 0.25, 1.0]
    got = streamed_average(rows, w)
    want = weighted_average(torch.stack(rows).double(), w)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, weighted_average(torch.stack(rows).double()), atol=1e-3)
    with pytest.raises(ValueError, match="one entry per row"):
        streamed_average(rows, w[:2])
    with pytest.raises(ValueError, match="finite and >= 0"):
        streamed_average(rows, [1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="one shape"):
        streamed_average([rows[0], rows[1][:10]], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        streamed_average([], [])
