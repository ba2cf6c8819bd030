"""The embedded benchmark: synthetic scenes over real texture photographs, with image labels and pixel masks
(docs/reproduction.md: the design, the columns, what it measures and why).

Invariants: ``label`` (the main class) covers strictly the most visible pixels of all classes after occlusion;
``mask`` k = ``SEGMENTATION_CLASSES[k]`` (0 = background); image ``i`` of a split depends only on ``(seed, split,
i)``; a background that cannot be loaded is an error, never a silently different dataset.
"""

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Bump when the rendering changes: it is part of the cache key, so old caches are never reused by mistake.
# 2: several objects of different classes per scene on a 2 x 2 layout; scikit-image backgrounds only.
# 3: a class is a shape; colours and patterns drawn per object from a pool shared by all classes; the main class
#    appears twice per scene.
GENERATOR_VERSION = 3

DEFAULT_IMAGE_SIZE = 64
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VALIDATION = 500

_SPLIT_IDS = {"train": 0, "validation": 1}


# ---------------------------------------------------------------- object classes: shape only
# A class is a SHAPE. Colours and surface patterns come from one pool shared by every class and are drawn per
# object (generator v3): colour or texture statistics of a patch or an image say nothing about its class, so
# random features are near chance and a probe can only succeed on features that encode shape - what a
# self-supervised model has to learn. (v2 gave each class its own colours and pattern: random-init features
# already scored most of what DINO reached, which hid whether training learned anything.)
OBJECT_CLASSES: list[str] = ["disk", "square", "ellipse", "triangle", "star", "ring", "cross", "crescent"]
SEGMENTATION_CLASSES: list[str] = ["background", *OBJECT_CLASSES]

# The shared appearance pool: RGB colours in [0, 1] (two different ones per object) and patterns that mix them.
COLOR_POOL: tuple[tuple[float, float, float], ...] = (
    (0.98, 0.82, 0.18), (0.92, 0.38, 0.05), (0.15, 0.35, 0.85), (0.92, 0.94, 0.98), (0.30, 0.72, 0.20),
    (0.08, 0.35, 0.08), (0.88, 0.12, 0.12), (0.62, 0.22, 0.78), (0.98, 0.62, 0.85), (0.62, 0.38, 0.20),
    (0.10, 0.10, 0.12), (0.20, 0.75, 0.78),
)
# pattern -> (lowest, highest) frequency in cycles per object radius (unused by the frequency-free patterns)
PATTERN_POOL: dict[str, tuple[float, float]] = {
    "radial": (1.0, 1.0), "checker": (1.0, 2.0), "stripes": (1.5, 3.0), "bands": (1.5, 2.5), "dots": (2.0, 3.0),
    "spokes": (4.0, 8.0), "speckle": (0.0, 0.0), "solid": (0.0, 0.0),
}
# Preview colours of the mask classes (black background): for looking at masks only, never used in rendering.
_MASK_COLORS = np.asarray(((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                           (145, 30, 180), (70, 240, 240), (240, 50, 230)), dtype=np.uint8)


# Shapes: boolean membership from object-local coordinates (u, v), in units of the object radius (|u|,|v| <= 1).
# triangle: equilateral, inscribed in the unit circle (vertices at 90, 210, 330 degrees): three half-planes whose
# outward normals point at -90, 30 and 150 degrees, each edge at distance 0.5 from the centre. star: five arms.
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disk": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.78,
    "ellipse": lambda u, v: u * u + (v / 0.5) ** 2 <= 1.0,
    "triangle": lambda u, v: np.logical_and.reduce(
        [u * np.cos(a) + v * np.sin(a) <= 0.5 for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]),
    "star": lambda u, v: np.hypot(u, v) <= 0.45 + 0.55 * np.abs(np.cos(2.5 * np.arctan2(v, u))) ** 2.5,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.45**2),
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.9)),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.75**2),
}


@lru_cache(maxsize=None)
def _shape_area(shape: str) -> float:
    """Area of a shape in units of radius^2 (disk: pi), measured on a fixed 400 x 400 grid."""
    v, u = (np.mgrid[0:400, 0:400].astype(np.float64) + 0.5) / 200.0 - 1.0
    return float(_SHAPES[shape](u, v).mean() * 4.0)


# Objects of one "size" cover the same area whatever their shape (a triangle is drawn with a larger radius
# than a disk): radius = size * sqrt(_REFERENCE_AREA / area), so no class is small or large by construction.
_REFERENCE_AREA = 2.0


# Patterns: mixing weight in [0, 1] from local coordinates; they rotate and scale with the object.
def _pattern(name: str, u: np.ndarray, v: np.ndarray, freq: float, phase: float, rng: np.random.Generator) -> np.ndarray:
    rho = np.hypot(u, v)
    if name == "radial":  # bright centre fading to a darker rim
        return np.clip(rho, 0.0, 1.0) ** 1.5
    if name == "checker":
        return ((np.floor(u * 2 * freq + phase) + np.floor(v * 2 * freq + phase)) % 2).astype(np.float32)
    if name == "stripes":  # fine veins along the long axis
        return (0.5 + 0.5 * np.sin(2 * np.pi * freq * v + phase)) ** 4
    if name == "bands":  # wide stripes across the body
        return (np.sin(2 * np.pi * freq * v + phase) > 0).astype(np.float32)
    if name == "dots":
        return ((np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v + phase)) > 0.5).astype(np.float32)
    if name == "spokes":  # sprinkles around the ring
        return (np.sin(freq * np.arctan2(v, u) + phase) > 0.6).astype(np.float32)
    if name == "speckle":  # craters: sparse dark blobs
        return (rng.random(u.shape) < 0.12).astype(np.float32) * 0.8
    if name == "solid":
        return np.zeros_like(u)
    raise ValueError(f"unknown pattern {name!r}")


# ---------------------------------------------------------------- backgrounds: real texture photographs
# scikit-image's bundled images (inside its wheel, no download): the complete list of background sources.
BACKGROUND_SOURCES: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "immunohistochemistry",
                                       "hubble_deep_field", "coffee", "rocket")


@lru_cache(maxsize=1)
def _background_sources() -> tuple[tuple[np.ndarray, bool], ...]:
    """(H, W, 3) float32 photographs in [0, 1] with a flag: True = greyscale (tinted per scene); every one must load."""
    from skimage import data as skdata

    sources: list[tuple[np.ndarray, bool]] = []
    for name in BACKGROUND_SOURCES:
        try:
            array = getattr(skdata, name)()
        except Exception as err:
            raise RuntimeError(
                f"embedded benchmark: background photograph {name!r} of scikit-image cannot be loaded ({err!r}); "
                "without it the scenes would differ from every other machine. Reinstall scikit-image "
                "(a declared dependency: pip install 'scikit-image>=0.22')"
            ) from err
        grey = array.ndim == 2
        rgb = np.repeat(array[..., None], 3, axis=2) if grey else array[..., :3]
        sources.append((rgb.astype(np.float32) / 255.0, grey))
    return tuple(sources)


def sources_fingerprint() -> str:
    """Hash of every background photograph (names and pixels): part of the dataset cache key."""
    digest = hashlib.sha256()
    for name, (photo, grey) in zip(BACKGROUND_SOURCES, _background_sources()):
        digest.update(f"{name}:{photo.shape}:{grey};".encode())
        digest.update(np.ascontiguousarray(photo).tobytes())
    return digest.hexdigest()[:12]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) crop of a random photograph at a random scale, flipped/rotated and colour-jittered."""
    sources = _background_sources()
    photo, grey = sources[rng.integers(len(sources))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(size // 2, min(h, w)), min(h, w) + 1))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray((photo[top:top + side, left:left + side] * 255).astype(np.uint8))
    out = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    out = np.rot90(out, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if grey:  # tint greyscale textures with a random, mostly muted colour
        tint = 0.55 + 0.45 * rng.random(3)
        out = out * (tint / tint.max())
    out = out * rng.uniform(0.65, 1.15) + rng.uniform(-0.05, 0.05)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _draw_object(rng: np.random.Generator, size: int, class_id: int, radius: float, center: tuple[float, float],
                 canvas: np.ndarray, labels: np.ndarray) -> None:
    """Paint one object of ``class_id`` (0-based) onto ``canvas`` (S, S, 3) and ``labels`` (S, S) in place; only
    its bounding box is computed (every shape lies within 1.15 radii of its centre)."""
    theta = rng.uniform(0, 2 * np.pi)
    reach = 1.15 * radius
    top, bottom = max(0, int(center[1] - reach)), min(size, int(np.ceil(center[1] + reach)))
    left, right = max(0, int(center[0] - reach)), min(size, int(np.ceil(center[0] + reach)))
    if top >= bottom or left >= right:
        return
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32) + 0.5  # (h, w) pixel centres of the box
    dx, dy = (xs - center[0]) / radius, (ys - center[1]) / radius
    u = np.cos(theta) * dx + np.sin(theta) * dy  # (h, w) object-local coordinates
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    inside = _SHAPES[OBJECT_CLASSES[class_id]](u, v)
    if not inside.any():
        return
    # Appearance from the shared pool, independent of the class: two different colours and a pattern.
    first, second = rng.choice(len(COLOR_POOL), size=2, replace=False)
    pattern = list(PATTERN_POOL)[rng.integers(len(PATTERN_POOL))]
    weight = _pattern(pattern, u, v, rng.uniform(*PATTERN_POOL[pattern]), rng.uniform(0, 2 * np.pi), rng)
    brightness = rng.uniform(0.75, 1.12)
    color_a = np.clip(np.asarray(COLOR_POOL[first]) * brightness + rng.uniform(-0.06, 0.06, 3), 0, 1)
    color_b = np.clip(np.asarray(COLOR_POOL[second]) * brightness + rng.uniform(-0.06, 0.06, 3), 0, 1)
    color = color_a * (1 - weight[..., None]) + color_b * weight[..., None]  # (h, w, 3)
    light = rng.uniform(0, 2 * np.pi)  # soft directional shading, as on a curved surface
    shading = 1.0 + 0.12 * (np.cos(light) * u + np.sin(light) * v)
    color = color * shading[..., None] + rng.normal(0, 0.03, color.shape)
    canvas[top:bottom, left:right][inside] = np.clip(color[inside], 0, 1)
    labels[top:bottom, left:right][inside] = class_id + 1


# Layout: object centres on a jittered 2 x 2 grid (in units of the canvas side), one object per cell.
_CELL_CENTERS = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))
# (instances of the main class, objects of other classes) -> probability. The two main instances share only their
# shape (a self-supervised model has a reason to learn it); the others, about as large, keep neighbouring regions
# different (semantic diffusion costs: the oracle that labels every object pixel with the image's class scores
# < 50 mIoU).
_LAYOUTS_P = {(2, 1): 0.15, (2, 2): 0.85}
# Size of a main-class instance (in units of the canvas side) and of the others relative to the smaller one.
MAIN_SIZE = (0.24, 0.30)
OTHER_SIZE = (0.85, 1.05)
# Largest shift of an object from its cell centre (canvas units): wide enough that objects are not at fixed
# places, which let raw-pixel probes match silhouettes (0.05 in a draft of this layout: majority-vote raw-pixel
# k-NN 24.6 %, linear 25.8 %; 0.12: 16.6 %, 14.4 %; weighted k-NN as shipped 15.4 %; chance 12.5 %).
CELL_JITTER = 0.12
# Every object of a scene covers at least this share of its pixels (after occlusion): no invisible regions.
MIN_OBJECT_SHARE = 0.02


def render_scene(rng: np.random.Generator, image_size: int, main_class: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(image (S, S, 3) uint8, mask (S, S) uint8 with 0 = background and k = class k - 1, label = ``main_class``).
    Layouts in which another class covers as many pixels as ``main_class`` (0-based), or a class is (nearly) hidden,
    are redrawn with the other objects a little smaller."""
    hi = 2 * image_size  # render at 2x and box-downsample: anti-aliased edges
    background = _background(rng, hi)
    layouts = list(_LAYOUTS_P)
    n_main, n_other = layouts[rng.choice(len(layouts), p=list(_LAYOUTS_P.values()))]
    others = [c for c in range(len(OBJECT_CLASSES)) if c != main_class]
    for attempt in range(20):
        canvas, labels = background.copy(), np.zeros((hi, hi), dtype=np.uint8)
        classes = [main_class] * n_main + [int(c) for c in rng.choice(others, size=n_other, replace=False)]
        cells = rng.permutation(len(_CELL_CENTERS))[:len(classes)]
        main_sizes = rng.uniform(*MAIN_SIZE, size=n_main) * hi
        shrink = 1.0 - 0.025 * attempt  # each retry: the other objects a little smaller
        objects = []
        for k, (class_id, cell) in enumerate(zip(classes, cells)):
            size = main_sizes[k] if k < n_main else main_sizes.min() * rng.uniform(*OTHER_SIZE) * shrink
            radius = size * np.sqrt(_REFERENCE_AREA / _shape_area(OBJECT_CLASSES[class_id]))
            center = tuple((np.asarray(_CELL_CENTERS[cell]) + rng.uniform(-CELL_JITTER, CELL_JITTER, 2)) * hi)
            objects.append((class_id, radius, center))
        for index in rng.permutation(len(objects)):  # random depth order: occlusion either way
            class_id, radius, center = objects[index]
            _draw_object(rng, hi, class_id, float(radius), center, canvas, labels)
        mask = _majority_downsample(labels, len(SEGMENTATION_CLASSES))
        counts = np.bincount(mask.ravel(), minlength=len(SEGMENTATION_CLASSES))[1:]
        visible = all(counts[c] >= MIN_OBJECT_SHARE * image_size**2 for c in classes)
        if visible and counts[main_class] >= 0.04 * image_size**2 and counts[main_class] == counts.max() and \
                (counts == counts[main_class]).sum() == 1:
            break
    else:
        raise RuntimeError(f"could not render a scene whose main class ({OBJECT_CLASSES[main_class]}) dominates")
    image = canvas.reshape(image_size, 2, image_size, 2, 3).mean(axis=(1, 3))
    return (image * 255 + 0.5).astype(np.uint8), mask, main_class


def _majority_downsample(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(2S, 2S) labels -> (S, S): the most frequent label in each 2x2 block (ties -> lower id)."""
    s = labels.shape[0] // 2
    onehot = np.eye(num_classes, dtype=np.uint8)[labels]  # (2S, 2S, C)
    votes = onehot.reshape(s, 2, s, 2, num_classes).sum(axis=(1, 3))  # (S, S, C)
    return votes.argmax(axis=-1).astype(np.uint8)


def _split_classes(seed: int, split: str, n: int) -> np.ndarray:
    """Main class of each image: a fresh permutation of all classes per block of K images (exact balance)."""
    k = len(OBJECT_CLASSES)
    blocks = [np.random.default_rng([seed, _SPLIT_IDS[split], 1_000_003, b]).permutation(k) for b in range((n + k - 1) // k)]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=np.int64)


def generate_split(split: str, num_images: int, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                   progress: bool = True) -> dict[str, list]:
    """Render ``num_images`` scenes of ``split`` as {"image": [PIL RGB], "label": [int], "mask": [PIL L]}."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {list(_SPLIT_IDS)}, got {split!r}")
    from tqdm.auto import tqdm

    classes = _split_classes(seed, split, num_images)
    out: dict[str, list] = {"image": [], "label": [], "mask": []}
    for i in tqdm(range(num_images), desc=f"rendering {split} scenes", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])  # image i depends only on (seed, split, i)
        image, mask, label = render_scene(rng, image_size, int(classes[i]))
        out["image"].append(Image.fromarray(image, mode="RGB"))
        out["mask"].append(Image.fromarray(mask, mode="L"))
        out["label"].append(label)
    return out


def default_cache_dir() -> Path:
    """``$ENTMAX_VIT_CACHE`` or ``~/.cache/entmax_vit``."""
    return Path(os.environ.get("ENTMAX_VIT_CACHE") or Path.home() / ".cache" / "entmax_vit")


def load_synthetic_scenes(image_size: int = DEFAULT_IMAGE_SIZE, num_train: int = DEFAULT_NUM_TRAIN,
                          num_validation: int = DEFAULT_NUM_VALIDATION, seed: int = 0,
                          cache_dir: Optional[str | os.PathLike] = None, progress: bool = True):
    """A ``datasets.DatasetDict`` of "train" and "validation", rendered once (a few seconds per thousand 64 px
    images), then loaded from ``cache_dir/synthetic_scenes/<key>`` (default: :func:`default_cache_dir`)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, load_from_disk
    from datasets import Image as ImageFeature

    for name, value, low in (("image_size", image_size, 16), ("num_train", num_train, 1),
                             ("num_validation", num_validation, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (f"v{GENERATOR_VERSION}_src{sources_fingerprint()}_size{image_size}_train{num_train}_val{num_validation}"
           f"_seed{seed}")
    target = root / "synthetic_scenes" / key
    if (target / "dataset_dict.json").exists():
        logger.info("synthetic scenes: loading cached %s", target)
        return load_from_disk(str(target))

    start = time.perf_counter()
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=OBJECT_CLASSES), "mask": ImageFeature()})
    splits = {split: Dataset.from_dict(generate_split(split, n, image_size, seed, progress), features=features)
              for split, n in (("train", num_train), ("validation", num_validation))}
    scenes = DatasetDict(splits)
    # Write to a private folder, then rename: concurrent first uses never see a half-written cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{key}.tmp{os.getpid()}"
    scenes.save_to_disk(str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("synthetic scenes: rendered %d + %d images in %.1f s -> %s", num_train, num_validation,
                time.perf_counter() - start, target)
    return load_from_disk(str(target))


def save_preview(split, path: str | os.PathLike, num: int = 16, columns: int = 8) -> Path:
    """Save a PNG grid of ``num`` samples of a split: each image above its coloured mask, titled by label."""
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    num = min(num, len(split))
    rows = 2 * ((num + columns - 1) // columns)
    fig = Figure(figsize=(1.6 * columns, 1.7 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(num):
        row, col = 2 * (i // columns), i % columns
        example = split[i]
        axes[row, col].imshow(example["image"])
        axes[row, col].set_title(OBJECT_CLASSES[example["label"]], fontsize=8)
        axes[row + 1, col].imshow(_MASK_COLORS[np.asarray(example["mask"])])
    fig.suptitle("synthetic scenes: image / mask (black = background)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


@dataclasses.dataclass
class ScenesConfig:
    # Side of every image in pixels.
    image_size: int = DEFAULT_IMAGE_SIZE
    # Images in the train split.
    num_train: int = DEFAULT_NUM_TRAIN
    # Images in the validation split.
    num_validation: int = DEFAULT_NUM_VALIDATION
    # Seed of the generator: image i of a split depends only on (seed, split, i).
    seed: int = 0
    # Cache folder of rendered splits (default: $ENTMAX_VIT_CACHE or ~/.cache/entmax_vit).
    cache_dir: Optional[str] = None
    # Write a PNG grid of validation samples and their masks here.
    preview: Optional[str] = None


def main(cfg: ScenesConfig):
    scenes = load_synthetic_scenes(cfg.image_size, cfg.num_train, cfg.num_validation, cfg.seed, cfg.cache_dir)
    print(scenes)
    if cfg.preview:
        print(f"preview: {save_preview(scenes['validation'], cfg.preview)}")
    return scenes

