"""A deterministic synthetic anomaly dataset in the MVTec-AD layout, with exact masks.

Five categories, two textures and three objects, rendered at a chosen size with varied
background colour, lighting ramps, pose and sensor noise.  Each category has three defect kinds
out of: scratch, crack, hole, stain, missing (part of the object gone), colour_shift, deformation.
The ground-truth mask of a defect is exactly the set of pixels that the defect changed.

Every image is drawn from its own seed (dataset seed, category, split, index), so the output
does not depend on generation order and regenerating gives byte-identical files.
"""
from __future__ import annotations

import io
import itertools
import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw
from skimage.morphology import dilation, disk
from tqdm.auto import tqdm

from clipfusion.outputs import write_atomic

GENERATOR_VERSION = 1
MANIFEST = "synthetic.json"

DEFECTS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "fabric": ("scratch", "hole", "stain"),
    "marble": ("crack", "colour_shift", "stain"),
    "disc": ("hole", "missing", "deformation"),
    "plate": ("scratch", "missing", "colour_shift"),
    "capsule": ("crack", "deformation", "colour_shift"),
}
CATEGORIES = tuple(DEFECTS_BY_CATEGORY)
TEXTURES = ("fabric", "marble")


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; equal specs give identical datasets."""

    categories: tuple[str, ...] = CATEGORIES
    image_size: int = 256
    n_train: int = 10
    n_test_good: int = 6
    n_test_per_defect: int = 4
    seed: int = 0
    version: int = field(default=GENERATOR_VERSION)


@dataclass
class Scene:
    """A rendered normal image before noise. image (H, W, 3) float in [0, 1]; object_mask (H, W) bool."""

    image: np.ndarray
    object_mask: np.ndarray
    background: np.ndarray


def _rng(*keys: object) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _lighting(size: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative illumination (H, W, 1): global gain times a linear ramp in a random direction."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / (size / 2)
    gain = rng.uniform(0.88, 1.08) * (1 + rng.uniform(0.04, 0.12) * ramp)
    return gain[:, :, None]


def _smooth_noise(size: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return noise / (noise.std() + 1e-12)


def _background(size: int, rng: np.random.Generator, base: tuple[float, float, float]) -> np.ndarray:
    colour = np.clip(np.array(base) + rng.uniform(-0.06, 0.06, 3), 0, 1)
    return colour[None, None, :] * (1 + 0.02 * _smooth_noise(size, rng, size / 8))[:, :, None]


def _render_fabric(size: int, rng: np.random.Generator) -> Scene:
    yy, xx = _grid(size)
    period = rng.uniform(9, 13)
    theta = rng.uniform(-0.2, 0.2)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    weave = 0.05 * np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
    colour = np.clip(np.array([0.35, 0.45, 0.62]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    image = colour[None, None, :] + weave[:, :, None]
    return Scene(image, np.ones((size, size), bool), image.copy())


def _render_marble(size: int, rng: np.random.Generator) -> Scene:
    colour = np.clip(np.array([0.78, 0.74, 0.68]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    veins = 0.05 * _smooth_noise(size, rng, size / 16) + 0.02 * _smooth_noise(size, rng, size / 48)
    image = colour[None, None, :] + veins[:, :, None]
    return Scene(image, np.ones((size, size), bool), image.copy())


def _pose(size: int, rng: np.random.Generator, max_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Object-frame coordinates (u, v) in pixels, for a randomly shifted and rotated object."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    angle = rng.uniform(-max_angle, max_angle)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return u, v


def _compose(background: np.ndarray, object_mask: np.ndarray, object_image: np.ndarray) -> Scene:
    image = np.where(object_mask[:, :, None], object_image, background)
    return Scene(image, object_mask, background)


def _render_disc(size: int, rng: np.random.Generator) -> Scene:
    background = _background(size, rng, (0.16, 0.2, 0.26))
    u, v = _pose(size, rng, 0.0)
    radius = np.hypot(u, v)
    outer = size * rng.uniform(0.29, 0.32)
    object_mask = radius <= outer
    shade = 0.8 + 0.2 * (1 - radius / outer)
    ring = 0.08 * (np.abs(radius - 0.55 * outer) < 0.04 * outer)
    colour = np.clip(np.array([0.74, 0.72, 0.66]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    object_image = colour[None, None, :] * shade[:, :, None] - ring[:, :, None]
    return _compose(background, object_mask, object_image)


def _render_plate(size: int, rng: np.random.Generator) -> Scene:
    background = _background(size, rng, (0.9, 0.88, 0.82))
    u, v = _pose(size, rng, 0.17)
    half_w, half_h, corner = 0.34 * size, 0.24 * size, 0.06 * size
    dx = np.maximum(np.abs(u) - (half_w - corner), 0)
    dy = np.maximum(np.abs(v) - (half_h - corner), 0)
    object_mask = np.hypot(dx, dy) <= corner
    hole_r = 0.045 * size
    for sx in (-1, 1):
        for sy in (-1, 1):
            object_mask &= np.hypot(u - sx * 0.24 * size, v - sy * 0.14 * size) > hole_r
    colour = np.clip(np.array([0.3, 0.32, 0.36]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    object_image = colour[None, None, :] * (1 + 0.08 * (u / half_w))[:, :, None]
    return _compose(background, object_mask, object_image)


def _render_capsule(size: int, rng: np.random.Generator) -> Scene:
    background = _background(size, rng, (0.2, 0.36, 0.3))
    u, v = _pose(size, rng, 0.26)
    half_len, radius = 0.26 * size, 0.13 * size
    object_mask = np.hypot(np.maximum(np.abs(u) - half_len, 0), v) <= radius
    left = np.array([0.82, 0.2, 0.18]) + rng.uniform(-0.03, 0.03, 3)
    right = np.array([0.92, 0.9, 0.86]) + rng.uniform(-0.03, 0.03, 3)
    object_image = np.where((u < 0)[:, :, None], left, right)
    object_image = object_image * (1 - 0.25 * (v / radius) ** 2)[:, :, None]
    return _compose(background, object_mask, np.clip(object_image, 0, 1))


RENDERERS: dict[str, Callable[[int, np.random.Generator], Scene]] = {
    "fabric": _render_fabric,
    "marble": _render_marble,
    "disc": _render_disc,
    "plate": _render_plate,
    "capsule": _render_capsule,
}


def _point_in(region: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    inner = ndimage.binary_erosion(region, iterations=margin) if margin else region
    candidates = np.argwhere(inner if inner.any() else region)
    y, x = candidates[rng.integers(len(candidates))]
    return int(y), int(x)


def _boundary_point(object_mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    edge = object_mask & ~ndimage.binary_erosion(object_mask)
    return _point_in(edge, rng, 0)


def _polyline_mask(shape: tuple[int, int], points: list[tuple[float, float]], width: int) -> np.ndarray:
    line = np.zeros(shape, bool)
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        rr, cc = draw.line(round(y0), round(x0), round(y1), round(x1))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        line[rr[keep], cc[keep]] = True
    return dilation(line, disk(width // 2)) if width > 1 else line


def _disk_mask(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    mask = np.zeros(shape, bool)
    rr, cc = draw.disk(centre, radius, shape=shape)
    mask[rr, cc] = True
    return mask


def _scratch(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    y, x = _point_in(scene.object_mask, rng, size // 8)
    points = [(float(y), float(x))]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(3):
        angle += rng.uniform(-0.5, 0.5)
        step = rng.uniform(0.08, 0.14) * size
        points.append((points[-1][0] + step * np.sin(angle), points[-1][1] + step * np.cos(angle)))
    mask = _polyline_mask(scene.object_mask.shape, points, int(rng.integers(3, 6))) & scene.object_mask
    colour = np.array([0.95, 0.95, 0.92]) if rng.random() < 0.5 else np.array([0.06, 0.05, 0.05])
    image = scene.image.copy()
    image[mask] = colour
    return image, mask


def _crack(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    y, x = _point_in(scene.object_mask, rng, size // 10)
    points = [(float(y), float(x))]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(size * 0.35)):
        angle += rng.normal(0, 0.45)
        points.append((points[-1][0] + 2.0 * np.sin(angle), points[-1][1] + 2.0 * np.cos(angle)))
    mask = _polyline_mask(scene.object_mask.shape, points, 3) & scene.object_mask
    image = scene.image.copy()
    image[mask] = image[mask] * 0.15
    return image, mask


def _hole(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    radius = rng.uniform(0.04, 0.075) * size
    centre = _point_in(scene.object_mask, rng, int(radius) + 2)
    mask = _disk_mask(scene.object_mask.shape, centre, radius) & scene.object_mask
    image = scene.image.copy()
    yy, xx = _grid(size)
    depth = 1 - np.hypot(yy - centre[0], xx - centre[1]) / radius
    image[mask] = (0.03 + 0.08 * (1 - depth[mask]))[:, None] * np.ones(3)
    return image, mask


def _stain(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    radius = rng.uniform(0.07, 0.12) * size
    centre = _point_in(scene.object_mask, rng, int(radius // 2))
    yy, xx = _grid(size)
    blob = 1 - np.hypot(yy - centre[0], xx - centre[1]) / radius + 0.35 * _smooth_noise(size, rng, radius / 4)
    mask = (blob > 0.2) & scene.object_mask
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count > 1:  # keep the main blob: a stain is one connected region
        mask = labels == (1 + int(np.argmax(ndimage.sum(mask, labels, range(1, count + 1)))))
    tint = np.array([0.45, 0.3, 0.12]) + rng.uniform(-0.05, 0.05, 3)
    alpha = np.clip(0.55 + 0.3 * blob, 0.55, 0.85)[:, :, None]
    image = np.where(mask[:, :, None], (1 - alpha) * scene.image + alpha * tint, scene.image)
    return image, mask


def _missing(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    centre = _boundary_point(scene.object_mask, rng)
    mask = _disk_mask(scene.object_mask.shape, centre, rng.uniform(0.08, 0.12) * size) & scene.object_mask
    image = np.where(mask[:, :, None], scene.background, scene.image)
    return image, mask


def _colour_shift(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = _point_in(scene.object_mask, rng, size // 12)
    ry, rx = rng.uniform(0.06, 0.11, 2) * size
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & scene.object_mask
    shift = np.zeros(3)
    shift[rng.permutation(3)[:2]] = (0.28, -0.22)
    image = scene.image.copy()
    image[mask] = np.clip(image[mask][:, [1, 2, 0]] * 0.5 + image[mask] * 0.5 + shift, 0, 1)
    return image, mask


def _deformation(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Push the outline outwards or inwards with a smooth local displacement field."""
    size = scene.image.shape[0]
    cy, cx = _boundary_point(scene.object_mask, rng)
    yy, xx = _grid(size)
    com_y, com_x = ndimage.center_of_mass(scene.object_mask)
    normal = np.array([cy - com_y, cx - com_x])
    normal /= np.linalg.norm(normal) + 1e-12
    sigma = rng.uniform(0.05, 0.08) * size
    strength = rng.uniform(0.07, 0.1) * size * (1 if rng.random() < 0.5 else -1)
    bump = strength * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    coords = np.stack([yy - bump * normal[0], xx - bump * normal[1]])
    image = np.stack(
        [ndimage.map_coordinates(scene.image[:, :, c], coords, order=1, mode="nearest") for c in range(3)],
        axis=2,
    )
    mask = np.abs(image - scene.image).max(axis=2) > 0.06
    mask = ndimage.binary_opening(mask)
    image = np.where(mask[:, :, None], image, scene.image)
    return image, mask


DEFECT_FUNCTIONS: dict[str, Callable[[Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "missing": _missing,
    "colour_shift": _colour_shift,
    "deformation": _deformation,
}


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting and sensor noise, then 8-bit quantisation."""
    lit = image * _lighting(image.shape[0], rng) + rng.normal(0, 0.01, image.shape)
    return np.clip(np.round(lit * 255), 0, 255).astype(np.uint8)


def render(category: str, defect: str | None, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``category``, normal when ``defect`` is None.

    Returns image (H, W, 3) uint8 and mask (H, W) bool (all False for normal images).
    """
    scene = RENDERERS[category](size, rng)
    if defect is None:
        return _finish(scene.image, rng), np.zeros((size, size), bool)
    min_pixels = max(12, (size * size) // 4000)
    for _ in range(20):  # redraw the rare defect that falls almost entirely off the object
        image, mask = DEFECT_FUNCTIONS[defect](scene, rng)
        if mask.sum() >= min_pixels:
            return _finish(image, rng), mask
    raise RuntimeError(f"could not place a {defect} defect on {category}")  # pragma: no cover


def _save(array: np.ndarray, path: Path) -> None:
    """A PNG written atomically: an interrupted generation never leaves a truncated image behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def generate(out: str | Path, spec: SyntheticSpec | None = None, progress: bool = True) -> Path:
    """Write the dataset described by ``spec`` under ``out`` in the MVTec-AD layout; returns ``out``."""
    spec = spec or SyntheticSpec()
    out = Path(out)
    unknown = [c for c in spec.categories if c not in DEFECTS_BY_CATEGORY]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {list(CATEGORIES)}")
    jobs: list[tuple[str, str, str | None, int]] = []
    for category in spec.categories:
        jobs += [(category, "train", None, i) for i in range(spec.n_train)]
        jobs += [(category, "test", None, i) for i in range(spec.n_test_good)]
        for defect in DEFECTS_BY_CATEGORY[category]:
            jobs += [(category, "test", defect, i) for i in range(spec.n_test_per_defect)]
    for category, split, defect, index in tqdm(jobs, desc="synthetic data", disable=not progress):
        rng = _rng(spec.seed, category, split, defect, index)
        image, mask = render(category, defect, spec.image_size, rng)
        name = f"{index:03d}"
        _save(image, out / category / split / (defect or "good") / f"{name}.png")
        if defect is not None:
            _save(mask.astype(np.uint8) * 255, out / category / "ground_truth" / defect / f"{name}_mask.png")
    write_atomic(out / MANIFEST, json.dumps(asdict(spec), indent=2))  # last: only a complete dataset has it
    return out


def ensure_synthetic(out: str | Path, spec: SyntheticSpec | None = None, progress: bool = True) -> Path:
    """Reuse the dataset at ``out`` when it was generated from the same spec, else (re)generate it."""
    spec = spec or SyntheticSpec()
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == json.loads(json.dumps(asdict(spec))):
                return out
        except json.JSONDecodeError:
            pass
    return generate(out, spec, progress)
