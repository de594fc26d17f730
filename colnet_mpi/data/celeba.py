"""CelebA from disk (torchvision's ``celeba`` folder layout): 40 attributes and 5 aligned landmarks.

Images are the aligned 218x178 JPEGs of ``img_align_celeba/``, opened lazily one item at a time
(a node never decodes its whole split up front), with values in [0, 1] and no normalisation.
Landmarks are the 10 pixel coordinates of ``list_landmarks_align_celeba.txt`` in the file's column
order (``LANDMARK_COLUMNS``). Note CelebA's naming: "lefteye" and "leftmouth" are the points on
the image's left (the smaller x), i.e. the subject's right; the labels keep that meaning under
augmentation (a horizontal flip swaps the left and right points).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .augment import augment_face
from .base import (
    NUM_LANDMARK_OUTPUTS,
    DataSizes,
    LabelledDataset,
    NodeData,
    TaskSpec,
    check_node_position,
    check_seed,
    locate_dataset_folder,
)
from .partition import (
    STREAM_HOLDOUT,
    STREAM_POOL,
    STREAM_TRAIN_VAL,
    make_rng,
    shard,
    split_train_val,
    task_stream,
)

DATASET_NAME = "celeba"
FOLDER = "celeba"
IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
EXPECTED_FILES: tuple[str, ...] = (f"{IMAGE_DIR}/*.jpg", ATTR_FILE, LANDMARK_FILE, PARTITION_FILE)

#: Native size of the aligned images.
NATIVE_HEIGHT = 218
NATIVE_WIDTH = 178

#: Codes of ``list_eval_partition.txt``.
PARTITION_TRAIN, PARTITION_VAL, PARTITION_TEST = 0, 1, 2

#: The 40 attributes, in the order of the header of ``list_attr_celeba.txt``.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

#: Header of ``list_landmarks_align_celeba.txt``; "left" = image-left (smaller x), see above.
LANDMARK_COLUMNS: tuple[str, ...] = (
    "lefteye_x",
    "lefteye_y",
    "righteye_x",
    "righteye_y",
    "nose_x",
    "nose_y",
    "leftmouth_x",
    "leftmouth_y",
    "rightmouth_x",
    "rightmouth_y",
)

CELEBA_TASKS: dict[str, TaskSpec] = {
    "attributes": TaskSpec(
        name="attributes",
        kind="multi_label",
        num_outputs=len(CELEBA_ATTRIBUTES),
        group="attributes",
    ),
    "landmarks": TaskSpec(
        name="landmarks", kind="landmarks", num_outputs=NUM_LANDMARK_OUTPUTS, group="landmarks"
    ),
}

#: Share of the official training split given to each task group, in ``TASK_ORDER``: the
#: attribute group takes the first 40 % of one seeded shuffle, the landmark group the next 40 %.
GROUP_FRACTION = 0.4
TASK_ORDER: tuple[str, ...] = ("attributes", "landmarks")


def how_to_obtain(root: str) -> str:
    """The sentence that tells a user how to put CelebA under ``root``."""
    return (
        "To obtain it, download from the official CelebA page "
        "(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, its Google Drive folder: "
        f"Img/img_align_celeba.zip, Anno/{ATTR_FILE}, Anno/{LANDMARK_FILE}, "
        f"Eval/{PARTITION_FILE}) and put them, the zip unpacked, under {root}/{FOLDER}/; or run "
        'on a machine with internet access python -c "import torchvision; '
        f"torchvision.datasets.CelebA('{root}', download=True)\" and copy {root}/{FOLDER}/ here."
    )


def _layout(root: str) -> str:
    """The expected layout, for error messages."""
    return f"{root}/{FOLDER}/{{{', '.join(EXPECTED_FILES)}}}"


def find_folder(root: str | os.PathLike[str]) -> Path:
    """Return the ``celeba`` folder for ``root`` (its parent or the folder itself).

    Raises FileNotFoundError naming the path, the expected files and how to obtain them if the
    root or the folder is missing, or if the image folder or a text file is missing.
    """
    base = Path(root).absolute()
    names = (IMAGE_DIR, ATTR_FILE, LANDMARK_FILE, PARTITION_FILE)
    folder = locate_dataset_folder(
        base,
        FOLDER,
        names,
        what="CelebA",
        layout=_layout(str(base)),
        how=how_to_obtain(str(base)),
    )
    missing = [f"{IMAGE_DIR}/"] if not (folder / IMAGE_DIR).is_dir() else []
    missing += [n for n in names[1:] if not (folder / n).is_file()]
    if missing:
        parent = str(folder.parent)
        raise FileNotFoundError(
            f"CelebA in {str(folder)!r} is incomplete: missing {', '.join(missing)}; "
            f"expected {_layout(parent)}. {how_to_obtain(parent)}"
        )
    return folder


def _bad_file(path: Path, problem: str) -> ValueError:
    """A ValueError naming a damaged text file and how to replace it."""
    return ValueError(
        f"CelebA file {str(path)!r} is not valid: {problem}. {how_to_obtain(str(path.parent.parent))}"
    )


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file (a ValueError if it cannot be read as text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _bad_file(path, f"cannot be read as text ({type(err).__name__}: {err})") from err
    return [line for line in text.splitlines() if line.strip()]


def read_partition(path: Path) -> tuple[list[str], np.ndarray]:
    """Read ``list_eval_partition.txt``: image names and their codes (0 train, 1 val, 2 test)."""
    names: list[str] = []
    codes: list[int] = []
    for number, line in enumerate(_read_lines(path), start=1):
        tokens = line.split()
        if len(tokens) != 2 or tokens[1] not in ("0", "1", "2"):
            raise _bad_file(path, f"line {number} {line!r} is not '<image>.jpg <0|1|2>'")
        names.append(tokens[0])
        codes.append(int(tokens[1]))
    if not names:
        raise _bad_file(path, "it lists no images")
    return names, np.asarray(codes, dtype=np.int64)


def read_table(
    path: Path, header: tuple[str, ...], names: list[str], rows: np.ndarray
) -> np.ndarray:
    """Read the given ``rows`` of an attribute or landmark file as int64 ``[len(rows), columns]``.

    The file is a count line, a header line (which must equal ``header``) and one line per image
    in the order of ``names`` (the partition file); only the requested rows are parsed.
    """
    lines = _read_lines(path)
    if len(lines) < 2:
        raise _bad_file(path, "it has no count and header lines")
    try:
        declared = int(lines[0].split()[0])
    except (ValueError, IndexError) as err:
        raise _bad_file(path, f"its first line {lines[0]!r} is not the image count") from err
    found = tuple(lines[1].split())
    if found != header:
        raise _bad_file(path, f"its header is {' '.join(found)!r}, expected {' '.join(header)!r}")
    body = lines[2:]
    if len(body) != declared:
        raise _bad_file(
            path, f"it declares {declared} images but has {len(body)} rows (truncated?)"
        )
    if len(body) != len(names):
        raise _bad_file(path, f"it has {len(body)} rows but {PARTITION_FILE} lists {len(names)}")
    out = np.empty((len(rows), len(header)), dtype=np.int64)
    for k, row in enumerate(rows):
        tokens = body[row].split()
        if len(tokens) != len(header) + 1 or tokens[0] != names[row]:
            raise _bad_file(
                path,
                f"row {row + 1} {body[row]!r} should start with {names[row]!r} and hold "
                f"{len(header)} values",
            )
        try:
            out[k] = [int(t) for t in tokens[1:]]
        except ValueError as err:
            raise _bad_file(path, f"row {row + 1} {body[row]!r} holds a non-integer") from err
    return out


def check_images(image_dir: Path, needed: list[str], listed: int) -> None:
    """Check with one directory listing that the needed JPEGs exist and the folder is complete.

    Every name in ``needed`` must be present, and the folder must hold at least ``listed`` JPEGs
    (the number of images in the partition file); no file is opened or stat-ed one by one.
    """
    try:
        present = set(os.listdir(image_dir))
    except OSError as err:
        raise FileNotFoundError(
            f"CelebA image folder {str(image_dir)!r} cannot be listed: {err}"
        ) from err
    root = str(image_dir.parent.parent)
    missing = [name for name in needed if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"CelebA image folder {str(image_dir)!r} is incomplete: {len(missing)} of the "
            f"{len(needed)} images this node needs are missing ({shown}); expected every image "
            f"of {PARTITION_FILE} as {IMAGE_DIR}/<name>.jpg. {how_to_obtain(root)}"
        )
    jpegs = sum(1 for name in present if name.lower().endswith(".jpg"))
    if jpegs < listed:
        raise FileNotFoundError(
            f"CelebA image folder {str(image_dir)!r} is incomplete: it holds {jpegs} JPEGs but "
            f"{PARTITION_FILE} lists {listed} images. {how_to_obtain(root)}"
        )


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode one JPEG as float ``[3, H, W]`` in [0, 1]: native 218x178, or resized to size x size."""
    from PIL import Image  # only CelebA runs decode images: others need not load Pillow

    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"CelebA image {str(path)!r} could not be decoded: {err}") from err
    if size:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    elif rgb.size != (NATIVE_WIDTH, NATIVE_HEIGHT):
        raise ValueError(
            f"CelebA image {str(path)!r} is {rgb.size[0]}x{rgb.size[1]} (width x height), not the "
            f"aligned {NATIVE_WIDTH}x{NATIVE_HEIGHT}; use img_align_celeba or set data.image_size > 0"
        )
    array = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)


def scale_landmarks(points: np.ndarray, size: int) -> np.ndarray:
    """Map native pixel coordinates ``[n, 10]`` (x, y pairs) onto a ``size x size`` resize.

    Pixel centres follow the resize: ``x' = (x + 0.5) * size / 178 - 0.5`` and likewise for y
    with 218, which is how a bilinear resize maps pixel centres.
    """
    out = points.astype(np.float64).copy()
    out[:, 0::2] = (out[:, 0::2] + 0.5) * size / NATIVE_WIDTH - 0.5
    out[:, 1::2] = (out[:, 1::2] + 0.5) * size / NATIVE_HEIGHT - 0.5
    return out


class CelebAImages(LabelledDataset):
    """CelebA images opened lazily by name, with their labels held in memory.

    ``size`` 0 keeps the native 218x178, a positive size resizes to a square (landmark labels
    must already be scaled with ``scale_landmarks``). With ``augment=True`` every item is flipped
    and rotated at random (``augment_face``), its landmarks moved with it.
    """

    def __init__(
        self,
        image_dir: Path,
        names: list[str],
        labels: torch.Tensor,
        *,
        size: int,
        landmarks: bool,
        augment: bool = False,
    ) -> None:
        self.image_dir = image_dir
        self.names = names
        self.labels = labels
        self.size = size
        self.landmarks = landmarks
        self.augment = augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.image_dir / self.names[index], self.size)
        label = self.labels[index]
        if self.augment:
            points = label.view(-1, 2) if self.landmarks else None
            image, moved = augment_face(image, points)
            if moved is not None:
                label = moved.reshape(-1)
        return image, label

    def augmented(self) -> CelebAImages:
        """The same images and labels, flipped and rotated at random per item (training view)."""
        return CelebAImages(
            self.image_dir,
            self.names,
            self.labels,
            size=self.size,
            landmarks=self.landmarks,
            augment=True,
        )


def build_celeba_node_data(
    task: str, position: int, group_size: int, *, seed: int, sizes: DataSizes, root: str
) -> NodeData:
    """Build one node's CelebA shard for ``task`` plus its group's common test split.

    The official training partition (code 0) is shuffled once with a generator seeded from
    ``seed`` alone (the same on every rank); the attribute group takes the first 40 % and the
    landmark group the next, disjoint 40 %. A group's share is split evenly over its nodes, node
    ``position`` truncates its slice to ``sizes.samples_per_node`` if that is > 0 and smaller and
    splits it 80/20 into train/val. The test split is the official test partition (code 2), or a
    seeded subset of ``sizes.test_samples`` of it, the same images for both groups.
    """
    check_seed(seed)
    check_node_position(position, group_size)
    if task not in CELEBA_TASKS:
        raise ValueError(
            f"unknown task {task!r} for dataset {DATASET_NAME!r}; allowed: {', '.join(CELEBA_TASKS)}"
        )
    size = sizes.image_size
    folder = find_folder(root)
    names, codes = read_partition(folder / PARTITION_FILE)
    train_rows = np.flatnonzero(codes == PARTITION_TRAIN)
    test_rows = np.flatnonzero(codes == PARTITION_TEST)
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise _bad_file(
            folder / PARTITION_FILE,
            f"it lists {len(train_rows)} training and {len(test_rows)} test images; both are needed",
        )

    n_group = int(GROUP_FRACTION * len(train_rows))
    order = make_rng(seed, task_stream(DATASET_NAME, "train_partition"), STREAM_POOL).permutation(
        len(train_rows)
    )
    first = TASK_ORDER.index(task) * n_group
    pool = train_rows[order[first : first + n_group]]
    node_rows = shard(pool, group_size, position)
    if sizes.samples_per_node > 0:
        node_rows = node_rows[: sizes.samples_per_node]
    train_sel, val_sel = split_train_val(
        node_rows, make_rng(seed, task_stream(DATASET_NAME, task), STREAM_TRAIN_VAL, position)
    )
    if sizes.test_samples > 0:
        if sizes.test_samples > len(test_rows):
            raise ValueError(
                f"test_samples={sizes.test_samples} is more than the {len(test_rows)} test "
                f"images listed in {str(folder / PARTITION_FILE)!r}"
            )
        pick = make_rng(seed, task_stream(DATASET_NAME, "test_partition"), STREAM_HOLDOUT)
        test_sel = test_rows[np.sort(pick.permutation(len(test_rows))[: sizes.test_samples])]
    else:
        test_sel = test_rows

    needed = np.concatenate([train_sel, val_sel, test_sel])
    image_dir = folder / IMAGE_DIR
    check_images(image_dir, [names[i] for i in needed], len(names))
    # one header read per split is enough to reject foreign images before training starts
    for rows in (train_sel, test_sel):
        load_image(image_dir / names[int(rows[0])], size)

    landmarks = task == "landmarks"
    if landmarks:
        values = read_table(folder / LANDMARK_FILE, LANDMARK_COLUMNS, names, needed)
        labels = scale_landmarks(values, size) if size else values
    else:
        values = read_table(folder / ATTR_FILE, CELEBA_ATTRIBUTES, names, needed)
        if not np.isin(values, (-1, 1)).all():
            raise _bad_file(folder / ATTR_FILE, "its attribute values are not all -1 or 1")
        labels = values == 1
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
    bounds = np.cumsum([0, len(train_sel), len(val_sel), len(test_sel)])

    def split(part: int) -> CelebAImages:
        lo, hi = bounds[part], bounds[part + 1]
        return CelebAImages(
            image_dir,
            [names[i] for i in needed[lo:hi]],
            y[lo:hi].clone(),
            size=size,
            landmarks=landmarks,
        )

    train = split(0)
    return NodeData(
        task=CELEBA_TASKS[task],
        train=train,
        val=split(1),
        test=split(2),
        channels=3,
        image_size=size or max(NATIVE_HEIGHT, NATIVE_WIDTH),
        train_augmented=train.augmented(),
    )
