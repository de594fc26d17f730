"""Training-time augmentation of the on-disk datasets: joint image/landmark geometry and CIFAR's recipe.

Conventions: an image is a float tensor ``[C, H, W]``; a point is ``(x, y)`` in pixels with x the
column and y the row, and pixel (row i, column j) has its centre at ``(x, y) = (j, i)``. Every
geometric operation maps the image and the points with the same pixel-centre convention, so a
point that marks a pixel before the transform marks the transformed pixel after it.

All randomness comes from torch's global generator (``torch.rand``), which the DataLoader seeds
per worker process, so augmented epochs are reproducible for a fixed run seed and worker count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: CIFAR-10 per-channel normalisation (pixel values in [0, 1]): the paper's constants / 255.
CIFAR_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)

#: Largest rotation, in degrees, of a training image (both datasets): uniform in [-10, 10].
MAX_ROTATION_DEGREES = 10.0
#: Zero padding on each side before CIFAR's random 32x32 crop.
CIFAR_CROP_PADDING = 4
#: Strength of CIFAR's colour jitter (brightness, contrast, saturation and hue).
CIFAR_JITTER = 0.1

#: Landmark point pairs exchanged by a horizontal flip, as indices of the five (x, y) points in
#: ``LANDMARK_NAMES`` order: the two eyes and the two mouth corners (the nose maps to itself).
FLIP_SWAP_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (3, 4))


def hflip(
    image: torch.Tensor, points: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mirror ``image`` left-right; mirror ``points`` ``[5, 2]`` too and swap left/right pairs.

    A point at column x moves to column ``W - 1 - x``. After mirroring, the point that was on
    the image's left is on its right, so the two eyes and the two mouth corners trade places in
    the output order (``FLIP_SWAP_PAIRS``); the labels keep meaning what they meant before.
    """
    flipped = torch.flip(image, dims=(-1,))
    if points is None:
        return flipped, None
    width = image.shape[-1]
    out = points.clone()
    out[:, 0] = (width - 1) - points[:, 0]
    for a, b in FLIP_SWAP_PAIRS:
        out[[a, b]] = out[[b, a]]
    return flipped, out


def rotate(
    image: torch.Tensor, angle_degrees: float, points: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate ``image`` (and ``points`` ``[k, 2]``) about the image centre, zero fill outside.

    Positive angles turn counter-clockwise on screen: with y pointing down, an offset from the
    centre moves by ``R = [[cos, sin], [-sin, cos]]``, so a point p goes to ``c + R (p - c)``
    with ``c = ((W - 1) / 2, (H - 1) / 2)``, the middle of the pixel grid. The image is resampled
    bilinearly with ``affine_grid``/``grid_sample`` under ``align_corners=True``, where pixel
    centres 0..W-1 map to -1..1 (offset = ``D`` times normalised coordinate, ``D = diag((W-1)/2,
    (H-1)/2)``): the output pixel at ``c + R (p - c)`` samples the input at p through
    ``D^-1 R^T D``, so image and points move together, also on non-square images.
    """
    if angle_degrees == 0.0:
        return image, None if points is None else points.clone()
    height, width = image.shape[-2:]
    a = math.radians(angle_degrees)
    cos, sin = math.cos(a), math.sin(a)
    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    # D^-1 R^T D: output normalised coordinate -> input normalised coordinate
    theta = torch.tensor(
        [[[cos, -sin * half_h / half_w, 0.0], [sin * half_w / half_h, cos, 0.0]]],
        dtype=image.dtype,
    )
    batch = image.unsqueeze(0)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=True)
    rotated = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if points is None:
        return rotated[0], None
    dx = points[:, 0].to(torch.float64) - half_w
    dy = points[:, 1].to(torch.float64) - half_h
    moved = torch.stack([half_w + cos * dx + sin * dy, half_h - sin * dx + cos * dy], dim=1)
    return rotated[0], moved.to(points.dtype)


def _uniform(low: float, high: float) -> float:
    """One draw from U(low, high) from torch's global generator."""
    return low + (high - low) * float(torch.rand(()))


def _coin() -> bool:
    """A fair coin from torch's global generator."""
    return bool(torch.rand(()) < 0.5)


def normalise_cifar(image: torch.Tensor) -> torch.Tensor:
    """Normalise a ``[3, H, W]`` image in [0, 1] with ``CIFAR_MEAN``/``CIFAR_STD``."""
    mean = torch.tensor(CIFAR_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


def _luma(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.2989 R + 0.587 G + 0.114 B`` of ``[3, H, W]`` as ``[1, H, W]``."""
    red, green, blue = image.unbind(dim=0)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(0)


def _mix(image: torch.Tensor, other: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * image + (1 - weight) * other``, clamped to [0, 1]."""
    return image.mul(weight).add_(other, alpha=1.0 - weight).clamp_(0.0, 1.0)


def _to_hsv(image: torch.Tensor) -> torch.Tensor:
    """RGB ``[3, H, W]`` in [0, 1] to hue, saturation, value stacked the same way; hue in [0, 1)."""
    red, green, _ = image.unbind(dim=0)
    low, high = torch.aminmax(image, dim=0)
    grey = high == low
    spread = high - low
    ones = torch.ones_like(high)
    saturation = spread / torch.where(grey, ones, high)
    # distance of each channel below the maximum, in units of the spread (1 where grey)
    rd, gd, bd = (
        (high.unsqueeze(0) - image) / torch.where(grey, ones, spread).unsqueeze(0)
    ).unbind(dim=0)
    red_is_max = high == red
    green_is_max = high == green
    # the hue sextant follows from which channel is the maximum (red first, then green, else blue)
    from_green = rd.add(2.0).sub_(bd).mul_(green_is_max & ~red_is_max)
    from_red = bd.sub_(gd).mul_(red_is_max)
    from_blue = gd.add_(4.0).sub_(rd).mul_(~red_is_max & ~green_is_max)
    hue = from_red.add_(from_green).add_(from_blue).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((hue, saturation, high), dim=0)


#: For each hue sextant 0..5, which of (value, p, q, t) becomes red, green and blue.
_SEXTANT_CHANNELS = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def _from_hsv(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_to_hsv`."""
    hue, sat, value = hsv.unbind(dim=0)
    scaled = hue.mul(6)
    sextant = torch.floor(scaled)
    frac = scaled.sub_(sextant)
    sextant = sextant.to(dtype=torch.int32).remainder_(6)
    sat_frac = sat * frac
    unsat = 1.0 - sat
    q = (1.0 - sat_frac).mul_(value).clamp_(0.0, 1.0)
    t = sat_frac.add_(unsat).mul_(value).clamp_(0.0, 1.0)
    p = unsat.mul_(value).clamp_(0.0, 1.0)
    table = torch.tensor(_SEXTANT_CHANNELS, dtype=torch.long, device=hsv.device)
    # an indexed read within one tensor (torch.gather), not communication: nothing leaves the rank
    return torch.gather(torch.stack((value, p, q, t), dim=0), 0, table[:, sextant])


def shift_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of an RGB image in [0, 1] by ``shift`` turns (in [-0.5, 0.5])."""
    hue, sat, value = _to_hsv(image).unbind(dim=0)
    hue = hue.add_(shift).remainder_(1.0)
    return _from_hsv(torch.stack((hue, sat, value), dim=0))


class ColorJitter:
    """Random brightness, contrast, saturation and hue changes, applied in a random order.

    On an RGB image ``[3, H, W]`` in [0, 1], with strength ``j``: brightness scales the image by
    ``U(1 - j, 1 + j)``; contrast mixes it with its mean luma, saturation with its luma image,
    each with weight ``U(1 - j, 1 + j)`` on the image; hue rotates by ``U(-j, j)`` turns
    (``j`` at most 0.5, and ``1 - j`` floored at 0). Every step clamps to [0, 1]. Draws from
    torch's global generator: a permutation of the four steps, then the four factors in the
    order above. Results and random draws equal torchvision's ``v2.ColorJitter(j, j, j, j)``
    on float images bit for bit (tested), without loading torchvision (tens of MB and seconds
    of start-up on every rank).
    """

    def __init__(self, strength: float) -> None:
        if not (0.0 <= strength <= 0.5):
            raise ValueError(f"colour jitter strength must lie in [0, 0.5], got {strength!r}")
        self.factors = (max(1.0 - strength, 0.0), 1.0 + strength)
        self.hue = (-strength, strength)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return a jittered copy of ``image``."""
        order = torch.randperm(4).tolist()
        draws = [
            float(torch.empty(1).uniform_(lo, hi).item())
            for lo, hi in (self.factors, self.factors, self.factors, self.hue)
        ]
        brightness, contrast, saturation, hue = draws
        out = image
        for step in order:
            if step == 0:
                out = out.mul(brightness).clamp_(0.0, 1.0)
            elif step == 1:
                mean = torch.mean(_luma(out), dim=(-3, -2, -1), keepdim=True)
                out = _mix(out, mean, contrast)
            elif step == 2:
                out = _mix(out, _luma(out), saturation)
            else:
                out = shift_hue(out, hue)
        return out


class CifarAugment:
    """CIFAR-10's training augmentation on a ``[3, 32, 32]`` image in [0, 1] (before normalising).

    Random 32x32 crop of the image zero-padded by 4, horizontal flip with probability 1/2,
    rotation by U(-10, 10) degrees (bilinear, zero fill) and colour jitter 0.1 of brightness,
    contrast, saturation and hue in random order; the result is clamped to [0, 1].
    """

    def __init__(self) -> None:
        self.jitter = ColorJitter(CIFAR_JITTER)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return a randomly augmented copy of ``image``."""
        height, width = image.shape[-2:]
        pad = CIFAR_CROP_PADDING
        padded = F.pad(image, (pad, pad, pad, pad))
        top = int(torch.randint(0, 2 * pad + 1, ()))
        left = int(torch.randint(0, 2 * pad + 1, ()))
        out = padded[:, top : top + height, left : left + width]
        if _coin():
            out, _ = hflip(out)
        out, _ = rotate(out, _uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
        out = self.jitter(out.clamp(0.0, 1.0))
        return out.clamp(0.0, 1.0).contiguous()


def augment_face(
    image: torch.Tensor, points: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CelebA's training augmentation: flip with probability 1/2, then rotate by U(-10, 10) degrees.

    ``points`` (``[5, 2]`` landmarks in pixels, or None for attribute labels) move with the image.
    """
    if _coin():
        image, points = hflip(image, points)
    angle = _uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
    image, points = rotate(image, angle, points)
    return image.clamp(0.0, 1.0).contiguous(), points
