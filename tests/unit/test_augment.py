"""Unit tests of the training augmentation (colnet_mpi.data.augment): image and points move together."""

from __future__ import annotations

import math

import pytest
import torch

from colnet_mpi.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    FLIP_SWAP_PAIRS,
    CifarAugment,
    augment_face,
    hflip,
    normalise_cifar,
    rotate,
)
from tests.conftest import run_python

H, W = 218, 178  # CelebA's native (height, width): non-square on purpose
POINTS = torch.tensor([[64.0, 105.0], [112.0, 109.0], [88.0, 135.0], [70.0, 157.0], [106.0, 160.0]])


def _dot_image(points: torch.Tensor, channel_of: list[int] | None = None) -> torch.Tensor:
    """Black image with a bright 5x5 square centred on each point (in its own channel if given)."""
    image = torch.zeros(3, H, W)
    for k, (x, y) in enumerate(points.round().long().tolist()):
        channels = [channel_of[k]] if channel_of else [0, 1, 2]
        for c in channels:
            image[c, y - 2 : y + 3, x - 2 : x + 3] = 1.0
    return image


def _centroid(weight: torch.Tensor) -> tuple[float, float]:
    """Brightness-weighted centre (x, y) of a [H, W] map."""
    ys, xs = torch.meshgrid(
        torch.arange(weight.shape[0], dtype=torch.float64),
        torch.arange(weight.shape[1], dtype=torch.float64),
        indexing="ij",
    )
    w = weight.to(torch.float64)
    total = float(w.sum())
    assert total > 1.0, "the dot disappeared"
    return float((w * xs).sum()) / total, float((w * ys).sum()) / total


def test_hflip_mirrors_points_and_swaps_left_right() -> None:
    image = _dot_image(POINTS[:1], [0])  # a dot on the left eye only
    flipped, moved = hflip(image, POINTS)
    assert moved is not None
    # the old image-left eye is now on the image's right, so it is the new index-1 point
    assert torch.allclose(moved[1], torch.tensor([W - 1 - POINTS[0, 0], POINTS[0, 1]]))
    assert torch.allclose(moved[0], torch.tensor([W - 1 - POINTS[1, 0], POINTS[1, 1]]))
    assert torch.allclose(moved[2], torch.tensor([W - 1 - POINTS[2, 0], POINTS[2, 1]]))
    assert torch.allclose(moved[3], torch.tensor([W - 1 - POINTS[4, 0], POINTS[4, 1]]))
    # the dot sits where the label that now describes it says
    cx, cy = _centroid(flipped[0])
    assert abs(cx - float(moved[1, 0])) < 1e-6 and abs(cy - float(moved[1, 1])) < 1e-6
    # image-left stays image-left after the swap
    assert moved[0, 0] < moved[1, 0] and moved[3, 0] < moved[4, 0]
    # flipping twice is the identity
    back_image, back = hflip(flipped, moved)
    assert torch.equal(back_image, image) and back is not None and torch.allclose(back, POINTS)
    assert FLIP_SWAP_PAIRS == ((0, 1), (3, 4))


@pytest.mark.parametrize("angle", [10.0, -10.0, 7.3, -3.1])
def test_rotation_moves_points_with_the_image(angle: float) -> None:
    for k in range(5):
        image = _dot_image(POINTS[k : k + 1])
        rotated, moved = rotate(image, angle, POINTS)
        assert moved is not None and rotated.shape == image.shape
        cx, cy = _centroid(rotated[0])
        assert math.hypot(cx - float(moved[k, 0]), cy - float(moved[k, 1])) < 1.0, (k, angle)
        # and the points really moved (a test that an identity would fail)
        assert math.hypot(*(moved[k] - POINTS[k]).tolist()) > 0.5


def test_rotation_direction_centre_and_identity() -> None:
    centre = torch.tensor([[(W - 1) / 2, (H - 1) / 2]])
    right = centre + torch.tensor([[40.0, 0.0]])
    _, moved = rotate(torch.zeros(3, H, W), 90.0, torch.cat([centre, right]))
    assert moved is not None
    assert torch.allclose(moved[0], centre[0], atol=1e-4)  # the centre stays put
    # +90 degrees is counter-clockwise on screen (y points down): right of centre -> above it
    assert torch.allclose(moved[1], centre[0] + torch.tensor([0.0, -40.0]), atol=1e-4)
    image = torch.rand(3, 8, 6)
    same, pts = rotate(image, 0.0, POINTS[:2])
    assert torch.equal(same, image) and pts is not None and torch.equal(pts, POINTS[:2])


def test_augment_face_is_seeded_and_keeps_labels_consistent() -> None:
    image = _dot_image(POINTS[:1], [0])
    results = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        results.append(augment_face(image, POINTS.clone()))
    (a, pa), (b, pb), (c, pc) = results
    assert pa is not None and pb is not None and pc is not None
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    for out, pts in ((a, pa), (c, pc)):
        cx, cy = _centroid(out[0])
        # the left-eye dot is at whichever eye label now points at it (index 1 after a flip)
        assert min(math.hypot(cx - float(pts[i, 0]), cy - float(pts[i, 1])) for i in (0, 1)) < 1.0
    no_points_image, none = augment_face(image, None)
    assert none is None and no_points_image.shape == image.shape


def test_cifar_augment_changes_images_within_range() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    aug = CifarAugment()
    outs = [aug(image) for _ in range(4)]
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not torch.equal(out, image)
    assert not torch.equal(outs[0], outs[1])
    torch.manual_seed(5)
    first = aug(image)
    torch.manual_seed(5)
    assert torch.equal(first, aug(image))


def test_cifar_normalisation_constants() -> None:
    mean = torch.tensor([125.3, 123.0, 113.9]) / 255
    std = torch.tensor([63.0, 62.1, 66.7]) / 255
    assert torch.allclose(torch.tensor(CIFAR_MEAN), mean) and torch.allclose(
        torch.tensor(CIFAR_STD), std
    )
    image = torch.rand(3, 4, 4)
    expected = (image - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(normalise_cifar(image), expected)


def test_colour_jitter_equals_torchvisions_bit_for_bit() -> None:
    """Our jitter draws and computes exactly what torchvision's v2.ColorJitter does on float
    images: same outputs and the global generator left in the same state (grey pixels and
    channel ties included)."""
    from torchvision.transforms import v2

    from colnet_mpi.data.augment import ColorJitter

    ours, theirs = ColorJitter(0.1), v2.ColorJitter(0.1, 0.1, 0.1, 0.1)
    for k in range(120):
        image = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(k))
        if k % 3 == 0:
            image[:, :5, :5] = 0.5  # grey: hue and saturation undefined
        if k % 4 == 0:
            image = image.round(decimals=1)  # two channels often share the maximum
        torch.manual_seed(k)
        a, next_a = ours(image), torch.rand(1)
        torch.manual_seed(k)
        b, next_b = theirs(image), torch.rand(1)
        assert torch.equal(a, b), k
        assert torch.equal(next_a, next_b), k


def test_colour_jitter_strength_checked_and_cifar_augment_needs_no_torchvision() -> None:
    from colnet_mpi.data.augment import ColorJitter

    with pytest.raises(ValueError, match=r"strength must lie in \[0, 0.5\], got 0.7"):
        ColorJitter(0.7)
    code = (
        "import sys, torch\n"
        "from colnet_mpi.data.augment import CifarAugment\n"
        "out = CifarAugment()(torch.rand(3, 32, 32))\n"
        "assert out.shape == (3, 32, 32) and 0 <= out.min() and out.max() <= 1\n"
        "assert 'torchvision' not in sys.modules and 'PIL' not in sys.modules\n"
    )
    run_python(code)
