"""Embedded task-heterogeneity data: procedural, seeded "synthetic faces" (attributes, landmarks).

Each image is an RGB picture of a cartoon face (skin-toned ellipse with hair, eyes, nose and mouth)
on a gradient background, under a random pose: centre jitter, scale and an in-plane rotation of
up to +-15 degrees. Six binary attributes (``FACE_ATTRIBUTES``) change what is drawn, and the five
landmarks (eye centres, nose tip, mouth corners) are the exact pixel positions of those points
after the pose transform, in CelebA's order (see ``base.LANDMARK_NAMES``). "Left" is the subject's
left: the left eye appears on the image's right side (larger x). Pixel coordinates: x = column,
y = row, and pixel (row i, column j) has its centre at (x, y) = (j, i).

Every sample is drawn from its own generator seeded by ``(seed, stream, split, index)``, so a node
generates only its own shard and a sample never depends on which other samples are generated.
Rendering is vectorised with numpy over whole batches of pixel grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import (
    NUM_LANDMARK_OUTPUTS,
    DataSizes,
    NodeData,
    TaskSpec,
    check_node_position,
    check_seed,
)
from .partition import STREAM_TRAIN_VAL, make_rng, split_train_val, task_stream

DATASET_NAME = "synthetic_faces"

FACE_ATTRIBUTES: tuple[str, ...] = (
    "smiling",
    "eyeglasses",
    "hat",
    "beard",
    "blond_hair",
    "mouth_open",
)

#: Probability that each attribute (same order as ``FACE_ATTRIBUTES``) is present.
ATTRIBUTE_RATES: tuple[float, ...] = (0.45, 0.4, 0.35, 0.35, 0.4, 0.45)

FACES_TASKS: dict[str, TaskSpec] = {
    "attributes": TaskSpec(
        name="attributes", kind="multi_label", num_outputs=len(FACE_ATTRIBUTES), group="attributes"
    ),
    "landmarks": TaskSpec(
        name="landmarks", kind="landmarks", num_outputs=NUM_LANDMARK_OUTPUTS, group="landmarks"
    ),
}

DEFAULT_SAMPLES_PER_NODE = 200
DEFAULT_TEST_SAMPLES = 200
#: Smallest image side at which the facial features are still drawn recognisably.
MIN_FACE_IMAGE_SIZE = 16

#: Fixed per-channel normalisation constants (pixel values in [0, 1]), measured once on the
#: generator's output and kept constant so that every shard is normalised identically.
FACES_MEAN: tuple[float, float, float] = (0.56, 0.52, 0.48)
FACES_STD: tuple[float, float, float] = (0.19, 0.19, 0.19)

#: Standard deviation of the additive Gaussian pixel noise (pixel values in [0, 1]).
NOISE_STD = 0.03

# Split codes of the per-sample seeds; distinct from the partition stream codes so that no sample
# generator ever coincides with a shuffling generator.
_SAMPLE_TRAIN_VAL = 10
_SAMPLE_TEST = 11

# Geometry of the face in its own frame (units of the image side; v points down, u to the
# image's right for an unrotated face).
_EYE_U, _EYE_V = 0.10, -0.06
_NOSE_V = 0.06
_MOUTH_V = 0.16
_CHUNK = 256


@dataclass(frozen=True)
class FaceBatch:
    """A batch of generated faces with their labels.

    ``images`` float32 [n, 3, S, S] in [0, 1]; ``attributes`` float32 [n, A] of 0/1 in
    ``FACE_ATTRIBUTES`` order; ``landmarks`` float32 [n, 10] in pixels (``LANDMARK_NAMES`` order).
    """

    images: np.ndarray
    attributes: np.ndarray
    landmarks: np.ndarray


# Columns of the per-sample uniform matrix (each sample draws _N_UNIFORMS numbers).
(
    _C_JX,
    _C_JY,
    _C_SCALE,
    _C_ROT,
    _C_FACE_A,
    _C_FACE_B,
    _C_SKIN,
    _C_SKIN_R,
    _C_SKIN_G,
    _C_SKIN_B,
    _C_BG0_R,
    _C_BG0_G,
    _C_BG0_B,
    _C_BG1_R,
    _C_BG1_G,
    _C_BG1_B,
    _C_BG_DIR,
    _C_HAIR_VAR,
    _C_HAT_H,
    _C_HAT_S,
    _C_GLASS,
    _C_BEND,
    _C_OPEN,
    _C_LIGHT,
    _C_ATTR0,
) = range(25)
_N_UNIFORMS = _C_ATTR0 + len(FACE_ATTRIBUTES)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Convert arrays of hue/saturation/value in [0, 1] to RGB, returning shape [..., 3]."""
    k = np.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], axis=-1)
    f = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] * (1.0 - s[..., None] * f)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Linear interpolation ``a + (b - a) * t`` (broadcasting)."""
    return a + (b - a) * t


class _Canvas:
    """A batch of images plus the per-pixel face-frame coordinates used to draw shapes."""

    def __init__(self, images: np.ndarray, u: np.ndarray, v: np.ndarray, px: np.ndarray) -> None:
        self.images = images  # [n, 3, S, S]
        self.u = u  # [n, S, S] face-frame coordinates of every pixel
        self.v = v
        self.px = px  # [n, 1, 1] pixels per face-frame unit (for anti-aliasing)

    def paint(self, sdf: np.ndarray, colour: np.ndarray, where: np.ndarray | None = None) -> None:
        """Blend ``colour`` ([n, 3] or [3]) into the pixels where ``sdf`` < 0 (soft 1-pixel edge).

        ``sdf`` is a signed distance in face-frame units; ``where`` ([n] bool) limits the layer
        to some samples.
        """
        alpha = np.clip(0.5 - sdf * self.px, 0.0, 1.0)
        if where is not None:
            alpha = alpha * where[:, None, None]
        colour = np.broadcast_to(np.asarray(colour, dtype=np.float32), (len(self.images), 3))
        alpha = alpha[:, None].astype(np.float32)
        self.images += alpha * (colour[:, :, None, None] - self.images)


def _ellipse_sdf(u: np.ndarray, v: np.ndarray, cu, cv, a, b) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    q = np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)
    return (q - 1.0) * np.minimum(a, b)


def _box_sdf(u: np.ndarray, v: np.ndarray, cu, cv, hu, hv) -> np.ndarray:
    """Signed (Chebyshev-style) distance to an axis-aligned box with half-sizes ``hu``, ``hv``."""
    return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)


def _draw_uniforms(seed: int, stream: int, split: int, start: int, count: int, size: int):
    """Return per-sample uniforms [count, _N_UNIFORMS] and unit noise [count, 3, size, size]."""
    uniforms = np.empty((count, _N_UNIFORMS), dtype=np.float64)
    noise = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        rng = np.random.default_rng([seed, stream, split, start + i])
        uniforms[i] = rng.random(_N_UNIFORMS)
        noise[i] = rng.standard_normal((3, size, size), dtype=np.float32)
    return uniforms, noise


def _render(uniforms: np.ndarray, noise: np.ndarray, size: int) -> FaceBatch:
    """Render one batch of faces from its per-sample uniforms and noise."""
    n = len(uniforms)

    def col(c: int) -> np.ndarray:
        """Column ``c`` of the per-sample uniforms."""
        return uniforms[:, c]

    attrs = (uniforms[:, _C_ATTR0:] < np.asarray(ATTRIBUTE_RATES)).astype(np.float32)
    smiling, glasses, hat, beard, blond, mouth_open = attrs.T > 0.5

    # Pose: centre (pixels), pixels per face unit, rotation.
    mid = (size - 1) / 2.0
    cx = mid + (col(_C_JX) - 0.5) * 0.10 * size
    cy = mid + 0.03 * size + (col(_C_JY) - 0.5) * 0.10 * size
    k = (0.88 + 0.22 * col(_C_SCALE)) * size
    theta = np.deg2rad((col(_C_ROT) - 0.5) * 30.0)
    cos_t, sin_t = np.cos(theta), np.sin(theta)

    grid = np.arange(size, dtype=np.float64)
    ys, xs = np.meshgrid(grid, grid, indexing="ij")  # [S, S]; x = column, y = row
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    c3, s3, k3 = cos_t[:, None, None], sin_t[:, None, None], k[:, None, None]
    u = (c3 * dx + s3 * dy) / k3
    v = (-s3 * dx + c3 * dy) / k3

    # Background: a linear gradient between two muted colours.
    bg0 = 0.25 + 0.6 * uniforms[:, [_C_BG0_R, _C_BG0_G, _C_BG0_B]]
    bg1 = 0.25 + 0.6 * uniforms[:, [_C_BG1_R, _C_BG1_G, _C_BG1_B]]
    phi = col(_C_BG_DIR) * 2.0 * np.pi
    t = (np.cos(phi)[:, None, None] * xs[None] + np.sin(phi)[:, None, None] * ys[None]) / size
    t = (t - t.min(axis=(1, 2), keepdims=True)) / (np.ptp(t, axis=(1, 2), keepdims=True) + 1e-9)
    images = _lerp(bg0[:, :, None, None], bg1[:, :, None, None], t[:, None]).astype(np.float32)
    canvas = _Canvas(images, u, v, k3)

    # Colours.
    tone = col(_C_SKIN)[:, None]
    skin = _lerp(np.array([0.45, 0.30, 0.20]), np.array([0.95, 0.80, 0.68]), tone)
    skin = skin + 0.05 * (uniforms[:, [_C_SKIN_R, _C_SKIN_G, _C_SKIN_B]] - 0.5)
    skin_dark = skin * 0.75
    hv = col(_C_HAIR_VAR)
    dark_hair = np.stack([0.08 + 0.25 * hv, 0.05 + 0.15 * hv, 0.03 + 0.08 * hv], axis=1)
    blond_hair = np.stack([0.88 + 0.1 * hv, 0.75 + 0.1 * hv, 0.35 + 0.1 * hv], axis=1)
    hair = np.where(blond[:, None], blond_hair, dark_hair)
    beard_colour = np.stack([0.22 + 0.1 * hv, 0.14 + 0.06 * hv, 0.08 + 0.04 * hv], axis=1)
    hat_colour = _hsv_to_rgb(col(_C_HAT_H), 0.6 + 0.4 * col(_C_HAT_S), np.full(n, 0.8))
    glass_colour = np.stack([0.05 + 0.1 * col(_C_GLASS)] * 3, axis=1)

    # Face shape (per-sample semi-axes).
    fa = (0.24 + 0.03 * col(_C_FACE_A))[:, None, None]
    fb = (0.31 + 0.03 * col(_C_FACE_B))[:, None, None]
    face = _ellipse_sdf(u, v, 0.0, 0.0, fa, fb)

    # Hair behind the head (upper part of a slightly larger ellipse) and the neck.
    hair_sdf = np.maximum(_ellipse_sdf(u, v, 0.0, -0.03, fa + 0.04, fb + 0.04), v - 0.02)
    canvas.paint(hair_sdf, hair)
    canvas.paint(_box_sdf(u, v, 0.0, fb + 0.15, 0.10, 0.2), skin_dark)
    canvas.paint(face, skin)
    # Fringe of hair on the forehead.
    canvas.paint(np.maximum(face, v + (fb - 0.08)), hair)

    # Beard: lower part of the face.
    canvas.paint(np.maximum(face, 0.09 - v), beard_colour, where=beard)

    # Eyes: whites and pupils.
    white = np.array([0.96, 0.96, 0.96])
    pupil = np.array([0.08, 0.06, 0.05])
    for side in (-1.0, 1.0):
        canvas.paint(_ellipse_sdf(u, v, side * _EYE_U, _EYE_V, 0.045, 0.028), white)
        canvas.paint(_ellipse_sdf(u, v, side * _EYE_U, _EYE_V, 0.021, 0.021), pupil)

    # Nose: a bridge and a darker tip ending at the nose-tip landmark.
    canvas.paint(_box_sdf(u, v, 0.0, (_EYE_V + _NOSE_V) / 2 + 0.01, 0.009, 0.05), skin_dark)
    canvas.paint(_ellipse_sdf(u, v, 0.0, _NOSE_V - 0.012, 0.026, 0.014), skin_dark)

    # Mouth between an upper curve and a lower curve, both bending like m(u) = 1 - (u/w)^2 so
    # that the corners stay at the mouth-corner landmarks. A smile is wider, curves down in the
    # middle (corners up) and shows white teeth; an open mouth drops the lower curve and shows a
    # dark cavity (with a strip of upper teeth when also smiling).
    half_w = np.where(smiling, 0.12, 0.09)[:, None, None]
    jitter = 0.01 * col(_C_BEND)
    bend_top = np.where(smiling, 0.008 + jitter, -0.008 + jitter)[:, None, None]
    bend_bottom = np.where(smiling, 0.055 + jitter, -0.008 + jitter)[:, None, None]
    opening = np.where(mouth_open, 0.045 + 0.02 * col(_C_OPEN), 0.0)[:, None, None]
    shape = 1.0 - np.clip(u / half_w, -1.0, 1.0) ** 2
    top = _MOUTH_V + bend_top * shape
    bottom = _MOUTH_V + (bend_bottom + opening) * shape
    outside_w = np.abs(u) - half_w

    def between(upper: np.ndarray, lower: np.ndarray, inset: float, inset_u: float) -> np.ndarray:
        """Signed distance to the region between two curves, shrunk by ``inset``/``inset_u``."""
        return np.maximum(outside_w + inset_u, np.maximum(upper + inset - v, v - lower + inset))

    # Lips reach a little past the corners; teeth and cavity stay clear of the corners.
    canvas.paint(between(top, bottom, -0.013, -0.013), np.array([0.70, 0.22, 0.25]))
    interior = between(top, bottom, 0.004, 0.02)
    teeth = np.array([0.97, 0.95, 0.90])
    canvas.paint(interior, teeth, where=smiling & ~mouth_open)
    canvas.paint(interior, np.array([0.18, 0.03, 0.05]), where=mouth_open)
    canvas.paint(np.maximum(interior, v - top - 0.022), teeth, where=smiling & mouth_open)

    # Eyeglasses: two rings, a bridge and arms to the face edge.
    ring_r, ring_w = 0.058, 0.008
    for side in (-1.0, 1.0):
        ring = np.abs(np.hypot(u - side * _EYE_U, v - _EYE_V) - ring_r) - ring_w
        canvas.paint(ring, glass_colour, where=glasses)
        arm_mid = side * (_EYE_U + ring_r + fa) / 2.0
        arm_half = (fa - _EYE_U - ring_r) / 2.0
        canvas.paint(_box_sdf(u, v, arm_mid, _EYE_V, arm_half, ring_w), glass_colour, glasses)
    bridge_half = _EYE_U - ring_r
    canvas.paint(_box_sdf(u, v, 0.0, _EYE_V, bridge_half, ring_w), glass_colour, where=glasses)

    # Hat: crown over the top of the head plus a brim.
    crown = _box_sdf(u, v, 0.0, -fb - 0.02, fa - 0.01, 0.14)
    canvas.paint(crown, hat_colour, where=hat)
    canvas.paint(_box_sdf(u, v, 0.0, -fb + 0.10, fa + 0.07, 0.025), hat_colour, where=hat)

    # Global lighting, pixel noise, clipping.
    light = (0.85 + 0.3 * col(_C_LIGHT)).astype(np.float32)[:, None, None, None]
    images = np.clip(canvas.images * light + NOISE_STD * noise, 0.0, 1.0).astype(np.float32)

    # Landmarks: face-frame points -> pixels with the same pose transform.
    corner_v = np.full(n, _MOUTH_V)
    points_u = np.stack(
        [np.full(n, _EYE_U), np.full(n, -_EYE_U), np.zeros(n), half_w[:, 0, 0], -half_w[:, 0, 0]],
        axis=1,
    )
    points_v = np.stack(
        [np.full(n, _EYE_V), np.full(n, _EYE_V), np.full(n, _NOSE_V), corner_v, corner_v], axis=1
    )
    lx = cx[:, None] + k[:, None] * (cos_t[:, None] * points_u - sin_t[:, None] * points_v)
    ly = cy[:, None] + k[:, None] * (sin_t[:, None] * points_u + cos_t[:, None] * points_v)
    landmarks = np.stack([lx, ly], axis=2).reshape(n, NUM_LANDMARK_OUTPUTS).astype(np.float32)
    return FaceBatch(images=images, attributes=attrs, landmarks=landmarks)


def generate_faces(
    seed: int, stream: int, split: int, start: int, count: int, image_size: int = 32
) -> FaceBatch:
    """Generate samples ``start .. start+count-1`` of the face sequence ``(seed, stream, split)``.

    Sample ``i`` depends only on ``(seed, stream, split, i)`` and ``image_size``, so disjoint index
    ranges give independent samples and a node can generate just its own range.
    """
    check_seed(seed)
    for name, value in (("stream", stream), ("split", split), ("start", start), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")
    if image_size < MIN_FACE_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} is too small for synthetic_faces; "
            f"allowed: >= {MIN_FACE_IMAGE_SIZE}"
        )
    parts = []
    for chunk_start in range(start, start + count, _CHUNK):
        chunk = min(_CHUNK, start + count - chunk_start)
        uniforms, noise = _draw_uniforms(seed, stream, split, chunk_start, chunk, image_size)
        parts.append(_render(uniforms, noise, image_size))
    if not parts:
        return FaceBatch(
            images=np.zeros((0, 3, image_size, image_size), dtype=np.float32),
            attributes=np.zeros((0, len(FACE_ATTRIBUTES)), dtype=np.float32),
            landmarks=np.zeros((0, NUM_LANDMARK_OUTPUTS), dtype=np.float32),
        )
    return FaceBatch(
        images=np.concatenate([p.images for p in parts]),
        attributes=np.concatenate([p.attributes for p in parts]),
        landmarks=np.concatenate([p.landmarks for p in parts]),
    )


def normalise_faces(images: np.ndarray) -> torch.Tensor:
    """Normalise [n, 3, S, S] images in [0, 1] with the fixed ``FACES_MEAN``/``FACES_STD``."""
    mean = np.asarray(FACES_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(FACES_STD, dtype=np.float32)[None, :, None, None]
    return torch.from_numpy(np.ascontiguousarray((images - mean) / std, dtype=np.float32))


def _dataset(batch: FaceBatch, task: str, rows: np.ndarray) -> TensorDataset:
    """Wrap the selected rows of ``batch`` as ``(x, y)`` for ``task``."""
    labels = batch.attributes if task == "attributes" else batch.landmarks
    x = normalise_faces(batch.images[rows])
    y = torch.from_numpy(np.ascontiguousarray(labels[rows], dtype=np.float32))
    return TensorDataset(x, y)


def build_faces_node_data(
    task: str, position: int, group_size: int, *, seed: int, sizes: DataSizes
) -> NodeData:
    """Build node ``position``'s synthetic-faces shard for ``task`` plus its group's test split.

    Each task group has its own sample stream (``task_stream``), so the groups' data are disjoint.
    The group's train/val pool is the sequence of samples ``0 .. group_size*n - 1`` of its
    train/val split (``n = sizes.samples_per_node`` or 200); node ``position`` generates only
    samples ``position*n .. (position+1)*n - 1`` and splits them 80/20 (seeded shuffle). The common
    test split is samples ``0 .. t - 1`` of the group's separate test sequence
    (``t = sizes.test_samples`` or 200), identical on every node of the group.
    """
    if task not in FACES_TASKS:
        raise ValueError(
            f"unknown task {task!r} for dataset {DATASET_NAME!r}; allowed: {', '.join(FACES_TASKS)}"
        )
    check_seed(seed)
    check_node_position(position, group_size)
    size = sizes.image_size
    if size < MIN_FACE_IMAGE_SIZE:
        raise ValueError(
            f"image_size={size} is too small for {DATASET_NAME!r}; "
            f"allowed: >= {MIN_FACE_IMAGE_SIZE}"
        )
    n_node = sizes.samples_per_node or DEFAULT_SAMPLES_PER_NODE
    n_test = sizes.test_samples or DEFAULT_TEST_SAMPLES
    stream = task_stream(DATASET_NAME, task)

    shard = generate_faces(seed, stream, _SAMPLE_TRAIN_VAL, position * n_node, n_node, size)
    train_rows, val_rows = split_train_val(
        np.arange(n_node), make_rng(seed, stream, STREAM_TRAIN_VAL, position)
    )
    test = generate_faces(seed, stream, _SAMPLE_TEST, 0, n_test, size)
    return NodeData(
        task=FACES_TASKS[task],
        train=_dataset(shard, task, np.sort(train_rows)),
        val=_dataset(shard, task, np.sort(val_rows)),
        test=_dataset(test, task, np.arange(n_test)),
        channels=3,
        image_size=size,
    )
