"""Synthetic road scenes in KITTI format, so the whole pipeline runs without the real data.

Each image is a road seen from a car-mounted camera: sky, buildings on the horizon, a road
trapezoid with lane markings and textured ground. Cars, vans, trucks, pedestrians, people
sitting and cyclists stand on the ground plane: an object of real height H3 whose image
height is h pixels has its bottom h * CAMERA_HEIGHT / H3 pixels below the horizon, so small
(far) objects sit near the horizon and large (near) ones low in the image, partly cut by the
borders. Objects are painted back to front; the label of each object is KITTI's:

- bbox: the extent of the object's silhouette clipped to the image (occlusion by nearer
  objects does not shrink it, as in KITTI);
- truncated: fraction of the silhouette outside the image;
- occluded: 0 fully visible, 1 partly occluded, 2 largely occluded, from the visible
  fraction of the in-image silhouette after painting;
- DontCare: clusters of small blurred clutter near the horizon.

Tram and Misc are never generated. Everything is drawn from numpy's PCG64 seeded with
(seed, image index), so an image does not depend on how many others are generated, and
the same seed gives byte-identical files. Sizes are chosen for a 188 px high image (KITTI
at half resolution) and scale with the height.
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from clock_deploy.data import kitti
from clock_deploy.errors import UserError
from clock_deploy.io import atomic_path, check_inside, write_error, write_text

CAMERA_HEIGHT = 1.65      # m, KITTI camera above the road
REFERENCE_HEIGHT = 188    # image height the pixel sizes below are chosen for
MARKER = "synthetic.json"  # written into the root; marks a directory this module may overwrite

# class -> (probability, pixel height range at 188 px (log-uniform), nominal real size h, w, l in m)
OBJECT_TYPES = {
    "Car": (0.38, (14, 130), (1.50, 1.65, 3.90)),
    "Van": (0.08, (18, 150), (2.10, 1.90, 5.00)),
    "Truck": (0.05, (22, 160), (3.20, 2.50, 9.00)),
    "Pedestrian": (0.24, (14, 120), (1.75, 0.60, 0.80)),
    "Person_sitting": (0.05, (14, 80), (1.30, 0.60, 0.90)),
    "Cyclist": (0.20, (14, 115), (1.75, 0.60, 1.80)),
}
# visible fraction of the in-image silhouette -> KITTI occlusion level
FULLY_VISIBLE = 0.9
PARTLY_VISIBLE = 0.5
MIN_VISIBLE = 0.25        # objects hidden more than this are left out of the scene
MAX_TRUNCATION = 0.8

CAR_COLOURS = [(200, 30, 30), (30, 60, 200), (230, 200, 40), (235, 235, 235), (25, 25, 30),
               (30, 140, 60), (230, 120, 30), (120, 30, 150)]
VAN_COLOURS = [(240, 240, 240), (210, 215, 220), (30, 40, 110), (190, 30, 30)]
CARGO_COLOURS = [(240, 240, 235), (200, 60, 40), (40, 90, 160), (220, 170, 40)]
SHIRT_COLOURS = [(220, 40, 40), (40, 160, 220), (250, 220, 30), (40, 180, 70), (240, 130, 30), (230, 230, 230)]
PANTS_COLOURS = [(35, 50, 100), (25, 25, 25), (110, 90, 60), (70, 70, 80)]
SKIN_COLOURS = [(230, 190, 155), (190, 140, 100), (120, 85, 60)]
FRAME_COLOURS = [(220, 30, 30), (30, 200, 220), (250, 240, 40), (40, 220, 60)]
GLASS = (55, 75, 95)
TYRE = (18, 18, 18)


# ---------------------------------------------------------------- sprites

def _colour(rng, palette, jitter=12):
    base = np.array(palette[rng.integers(len(palette))])
    return tuple(int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))


def _darker(colour, factor=0.45):
    return tuple(int(c * factor) for c in colour)


def _wheel(draw, cx, cy, r):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=TYRE)
    if r >= 3:
        draw.ellipse([cx - r / 2.5, cy - r / 2.5, cx + r / 2.5, cy + r / 2.5], fill=(130, 130, 130))


def _car_side(draw, w, h, rng):
    body = _colour(rng, CAR_COLOURS)
    r = min(0.22 * h, 0.12 * w)
    draw.polygon([(0.22 * w, 0.42 * h), (0.33 * w, 0.02 * h), (0.70 * w, 0.02 * h), (0.84 * w, 0.42 * h)],
                 fill=body, outline=_darker(body))
    draw.polygon([(0.27 * w, 0.42 * h), (0.36 * w, 0.1 * h), (0.51 * w, 0.1 * h), (0.51 * w, 0.42 * h)], fill=GLASS)
    draw.polygon([(0.54 * w, 0.42 * h), (0.54 * w, 0.1 * h), (0.68 * w, 0.1 * h), (0.78 * w, 0.42 * h)], fill=GLASS)
    draw.rounded_rectangle([0, 0.4 * h, w - 1, h - r * 0.8], radius=max(1, 0.08 * h), fill=body,
                           outline=_darker(body))
    for cx in (0.2 * w, 0.8 * w):
        _wheel(draw, cx, h - 1 - r, r)


def _car_rear(draw, w, h, rng):
    body = _colour(rng, CAR_COLOURS)
    draw.polygon([(0.1 * w, 0.45 * h), (0.2 * w, 0.03 * h), (0.8 * w, 0.03 * h), (0.9 * w, 0.45 * h)],
                 fill=body, outline=_darker(body))
    draw.polygon([(0.17 * w, 0.42 * h), (0.25 * w, 0.1 * h), (0.75 * w, 0.1 * h), (0.83 * w, 0.42 * h)], fill=GLASS)
    draw.rectangle([0.05 * w, 0.82 * h, 0.22 * w, h - 1], fill=TYRE)
    draw.rectangle([0.78 * w, 0.82 * h, 0.95 * w, h - 1], fill=TYRE)
    draw.rounded_rectangle([0, 0.43 * h, w - 1, 0.87 * h], radius=max(1, 0.06 * h), fill=body,
                           outline=_darker(body))
    for x0 in (0.04 * w, 0.8 * w):
        draw.rectangle([x0, 0.5 * h, x0 + 0.16 * w, 0.6 * h], fill=(240, 20, 20))
    draw.rectangle([0.4 * w, 0.66 * h, 0.6 * w, 0.76 * h], fill=(245, 245, 225))


def _van_side(draw, w, h, rng):
    body = _colour(rng, VAN_COLOURS)
    r = min(0.17 * h, 0.1 * w)
    draw.polygon([(0, 0.05 * h), (0.78 * w, 0.05 * h), (w - 1, 0.4 * h), (w - 1, h - r), (0, h - r)],
                 fill=body, outline=_darker(body))
    draw.rectangle([0.08 * w, 0.13 * h, 0.7 * w, 0.36 * h], fill=GLASS)
    draw.polygon([(0.76 * w, 0.13 * h), (0.82 * w, 0.13 * h), (0.95 * w, 0.38 * h), (0.76 * w, 0.38 * h)], fill=GLASS)
    for cx in (0.18 * w, 0.82 * w):
        _wheel(draw, cx, h - 1 - r, r)


def _van_rear(draw, w, h, rng):
    body = _colour(rng, VAN_COLOURS)
    draw.rectangle([0.04 * w, 0.85 * h, 0.2 * w, h - 1], fill=TYRE)
    draw.rectangle([0.8 * w, 0.85 * h, 0.96 * w, h - 1], fill=TYRE)
    draw.rounded_rectangle([0, 0.03 * h, w - 1, 0.9 * h], radius=max(1, 0.05 * h), fill=body,
                           outline=_darker(body))
    draw.rectangle([0.1 * w, 0.12 * h, 0.47 * w, 0.4 * h], fill=GLASS)
    draw.rectangle([0.53 * w, 0.12 * h, 0.9 * w, 0.4 * h], fill=GLASS)
    for x0 in (0.03 * w, 0.85 * w):
        draw.rectangle([x0, 0.55 * h, x0 + 0.12 * w, 0.7 * h], fill=(240, 20, 20))


def _truck_side(draw, w, h, rng):
    cab, cargo = _colour(rng, CAR_COLOURS), _colour(rng, CARGO_COLOURS)
    r = min(0.13 * h, 0.06 * w)
    draw.rectangle([0, 0, 0.76 * w, h - r * 1.2], fill=cargo, outline=_darker(cargo))
    draw.polygon([(0.78 * w, 0.25 * h), (0.93 * w, 0.25 * h), (w - 1, 0.5 * h), (w - 1, h - r), (0.78 * w, h - r)],
                 fill=cab, outline=_darker(cab))
    draw.polygon([(0.82 * w, 0.3 * h), (0.92 * w, 0.3 * h), (0.97 * w, 0.48 * h), (0.82 * w, 0.48 * h)], fill=GLASS)
    for cx in (0.12 * w, 0.26 * w, 0.88 * w):
        _wheel(draw, cx, h - 1 - r, r)


def _truck_rear(draw, w, h, rng):
    cargo = _colour(rng, CARGO_COLOURS)
    draw.rectangle([0.05 * w, 0.88 * h, 0.25 * w, h - 1], fill=TYRE)
    draw.rectangle([0.75 * w, 0.88 * h, 0.95 * w, h - 1], fill=TYRE)
    draw.rectangle([0, 0, w - 1, 0.9 * h], fill=cargo, outline=_darker(cargo))
    draw.line([(0.5 * w, 0.05 * h), (0.5 * w, 0.85 * h)], fill=_darker(cargo), width=max(1, int(0.02 * w)))
    for x0 in (0.02 * w, 0.88 * w):
        draw.rectangle([x0, 0.8 * h, x0 + 0.1 * w, 0.87 * h], fill=(240, 20, 20))


def _head(draw, cx, cy, r, rng):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng, SKIN_COLOURS, 8))
    draw.chord([cx - r, cy - r, cx + r, cy + r], 180, 360, fill=(40, 30, 20))  # hair


def _pedestrian(draw, w, h, rng):
    shirt, pants = _colour(rng, SHIRT_COLOURS), _colour(rng, PANTS_COLOURS)
    stride = rng.uniform(0.0, 0.32) * w
    leg = max(1, round(0.2 * w))
    hip_y = 0.55 * h
    draw.line([(0.42 * w, hip_y), (0.5 * w - stride, h - 1)], fill=pants, width=leg)
    draw.line([(0.58 * w, hip_y), (0.5 * w + stride, h - 1)], fill=pants, width=leg)
    draw.rectangle([0.22 * w, 0.17 * h, 0.78 * w, 0.57 * h], fill=shirt)
    arm = max(1, round(0.12 * w))
    draw.line([(0.2 * w, 0.2 * h), (0.08 * w, 0.52 * h)], fill=shirt, width=arm)
    draw.line([(0.8 * w, 0.2 * h), (0.92 * w, 0.52 * h)], fill=shirt, width=arm)
    r = min(0.085 * h, 0.3 * w)
    _head(draw, 0.5 * w, r + 0.5, r, rng)


def _person_sitting(draw, w, h, rng):
    shirt, pants = _colour(rng, SHIRT_COLOURS), _colour(rng, PANTS_COLOURS)
    limb = max(1, round(0.13 * h))
    draw.line([(0.3 * w, 0.62 * h), (0.8 * w, 0.62 * h)], fill=pants, width=limb)  # thighs
    draw.line([(0.8 * w, 0.6 * h), (0.85 * w, h - 1)], fill=pants, width=limb)     # shins
    draw.rectangle([0.12 * w, 0.2 * h, 0.48 * w, 0.66 * h], fill=shirt)
    draw.line([(0.4 * w, 0.25 * h), (0.7 * w, 0.5 * h)], fill=shirt, width=max(1, round(0.08 * h)))
    r = min(0.1 * h, 0.2 * w)
    _head(draw, 0.3 * w, r + 0.5, r, rng)


def _cyclist(draw, w, h, rng):
    frame, shirt, pants = _colour(rng, FRAME_COLOURS), _colour(rng, SHIRT_COLOURS), _colour(rng, PANTS_COLOURS)
    r = min(0.2 * h, 0.24 * w)
    rim = max(1, round(0.05 * h))
    back, front = (r + 0.5, h - 1 - r), (w - 1.5 - r, h - 1 - r)
    for cx, cy in (back, front):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=TYRE, width=rim)
    pedal, seat, bar = (0.45 * w, h - 1 - r), (0.38 * w, 0.5 * h), (0.7 * w, 0.45 * h)
    tube = max(1, round(0.035 * h))
    draw.line([back, pedal, seat, back], fill=frame, width=tube)
    draw.line([pedal, bar, front], fill=frame, width=tube)
    knee = (0.55 * w, 0.58 * h)
    draw.line([seat, knee, pedal], fill=pants, width=max(1, round(0.08 * h)))
    shoulder = (0.55 * w, 0.22 * h)
    draw.line([seat, shoulder], fill=shirt, width=max(1, round(0.13 * h)))
    draw.line([shoulder, bar], fill=shirt, width=max(1, round(0.05 * h)))
    hr = 0.08 * h
    _head(draw, 0.6 * w, hr + 0.5, hr, rng)
    draw.chord([0.6 * w - hr, 0.5, 0.6 * w + hr, 2 * hr + 0.5], 180, 360, fill=frame)  # helmet


SPRITES = {
    ("Car", "side"): _car_side, ("Car", "rear"): _car_rear,
    ("Van", "side"): _van_side, ("Van", "rear"): _van_rear,
    ("Truck", "side"): _truck_side, ("Truck", "rear"): _truck_rear,
    ("Pedestrian", "any"): _pedestrian, ("Person_sitting", "any"): _person_sitting,
    ("Cyclist", "side"): _cyclist,
}


def _sprite(name, view, w, h, rng):
    """RGBA array [h, w, 4] of one object; alpha > 0 marks its silhouette."""
    canvas = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    SPRITES[(name, view)](ImageDraw.Draw(canvas), w, h, rng)
    sprite = np.asarray(canvas)
    if rng.random() < 0.5:  # facing left or right
        sprite = sprite[:, ::-1]
    return sprite


# ---------------------------------------------------------------- scene

class _Scene:
    """Camera and road of one image: horizon row, vanishing point, road width at the bottom row."""

    def __init__(self, rng, height, width):
        self.height, self.width = height, width
        self.scale = height / REFERENCE_HEIGHT
        self.horizon = height * rng.uniform(0.33, 0.4)
        self.vp_x = width * rng.uniform(0.4, 0.6)
        self.road_half = width * rng.uniform(0.5, 0.8)
        self.focal = 1.92 * height  # KITTI: f = 721 px for 375 px high images

    def road_half_at(self, y):
        return self.road_half * (y - self.horizon) / (self.height - self.horizon)


def _background(rng, scene):
    H, W, hz = scene.height, scene.width, scene.horizon
    rows = np.arange(H, dtype=np.float32)[:, None, None]
    sky_top = np.array([90, 135, 200]) + rng.integers(-15, 16, 3)
    sky_low = np.array([195, 210, 225]) + rng.integers(-15, 16, 3)
    ground_far = np.array([120, 135, 95]) + rng.integers(-20, 21, 3)
    ground_near = ground_far * rng.uniform(0.7, 0.9)
    t_sky = np.clip(rows / hz, 0, 1)
    t_ground = np.clip((rows - hz) / (H - hz), 0, 1)
    image = np.where(rows < hz, sky_top * (1 - t_sky) + sky_low * t_sky,
                     ground_far * (1 - t_ground) + ground_near * t_ground)
    canvas = Image.fromarray(np.broadcast_to(image, (H, W, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # buildings and trees along the horizon: muted clutter the detector must learn to ignore
    x = rng.uniform(-30, 0)
    while x < W:
        bw, bh = rng.uniform(20, 90) * scene.scale, rng.uniform(6, 40) * scene.scale
        if rng.random() < 0.6:
            shade = rng.integers(110, 190)
            draw.rectangle([x, hz - bh, x + bw, hz], fill=(int(shade), int(shade * 0.95), int(shade * 0.85)))
        else:
            draw.ellipse([x, hz - bh * 1.2, x + bw, hz + 2], fill=(40, int(rng.integers(70, 110)), 40))
        x += bw + rng.uniform(0, 40) * scene.scale
    road = int(rng.integers(90, 125))
    bottom_l, bottom_r = scene.vp_x - scene.road_half, scene.vp_x + scene.road_half
    draw.polygon([(scene.vp_x - 2, hz), (scene.vp_x + 2, hz), (bottom_r, H), (bottom_l, H)], fill=(road,) * 3)
    for side in (-1.0, 1.0):  # road edges
        _lane_line(draw, scene, side, dashed=False)
    for side in (-1 / 3, 1 / 3):
        _lane_line(draw, scene, side, dashed=True, phase=rng.uniform(0, 1))
    image = np.asarray(canvas).astype(np.float32)
    # low-frequency texture: smooth brightness blotches compress well, unlike pixel noise
    grid = rng.normal(0, 7, (H // 12 + 2, W // 12 + 2)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(grid).resize((W, H), Image.BILINEAR))
    return image + blotches[:, :, None]


def _lane_line(draw, scene, side, dashed, phase=0.0):
    """A painted line converging to the vanishing point; dashes get shorter with distance."""
    H, hz = scene.height, scene.horizon
    ys = np.arange(int(hz) + 2, H + 1, dtype=np.float64)
    u = (ys - hz) / (H - hz)
    on = np.ones(len(ys), bool) if not dashed else (np.floor(1.5 / u + phase) % 2 == 0)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
        y0, y1 = ys[start], ys[stop - 1]
        half0, half1 = 0.3 + 2.0 * u[start] * scene.scale, 0.3 + 2.0 * u[stop - 1] * scene.scale
        x0 = scene.vp_x + side * scene.road_half_at(y0)
        x1 = scene.vp_x + side * scene.road_half_at(y1)
        draw.polygon([(x0 - half0, y0), (x0 + half0, y0), (x1 + half1, y1), (x1 - half1, y1)], fill=(235, 235, 225))


def _dont_care(rng, scene, image):
    """Paint a blurred cluster of tiny far objects near the horizon; return its box."""
    s = scene.scale
    bw, bh = rng.uniform(20, 60) * s, rng.uniform(6, 14) * s
    x0 = scene.vp_x + rng.uniform(-0.3, 0.3) * scene.width - bw / 2
    y0 = scene.horizon - bh * 0.6
    x0, y0 = int(np.clip(x0, 0, scene.width - bw - 1)), int(max(0, y0))
    x1, y1 = int(x0 + bw), int(min(scene.height, y0 + bh))
    patch = Image.fromarray(np.clip(image[y0:y1, x0:x1], 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(patch)
    for _ in range(rng.integers(2, 6)):
        w, h = rng.uniform(0.15, 0.4) * (x1 - x0), rng.uniform(0.4, 1.0) * (y1 - y0)
        px, py = rng.uniform(0, x1 - x0 - w), (y1 - y0) - h
        draw.rectangle([px, py, px + w, py + h], fill=_colour(rng, CAR_COLOURS, 30))
    image[y0:y1, x0:x1] = np.asarray(patch.filter(ImageFilter.GaussianBlur(1.2 * s)))
    return [x0, y0, x1, y1]


class _Object:
    """One sampled object: its sprite, top-left corner in the image and its 3D description."""

    def __init__(self, name, sprite, x0, y0, depth, alpha, dims, location, rotation_y):
        self.name, self.sprite, self.x0, self.y0 = name, sprite, x0, y0
        self.depth, self.alpha, self.dims, self.location, self.rotation_y = depth, alpha, dims, location, rotation_y

    def mask_in_image(self, height, width):
        """(silhouette mask cropped to the image, row slice, column slice, pixels outside the image)."""
        h, w = self.sprite.shape[:2]
        y0, x0 = min(max(0, self.y0), height), min(max(0, self.x0), width)
        ys = slice(y0, max(y0, min(height, self.y0 + h)))
        xs = slice(x0, max(x0, min(width, self.x0 + w)))
        silhouette = self.sprite[:, :, 3] > 0
        crop = silhouette[ys.start - self.y0:ys.stop - self.y0, xs.start - self.x0:xs.stop - self.x0]
        return crop, ys, xs, int(silhouette.sum() - crop.sum())


def _sample_object(rng, scene):
    names = list(OBJECT_TYPES)
    probs = np.array([OBJECT_TYPES[n][0] for n in names])
    name = names[rng.choice(len(names), p=probs / probs.sum())]
    _, (lo, hi), (h3, w3, l3) = OBJECT_TYPES[name]
    real = np.array([h3, w3, l3]) * rng.uniform(0.93, 1.07, 3)
    h = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * scene.scale
    bottom = scene.horizon + h * CAMERA_HEIGHT / real[0]
    road = scene.road_half_at(bottom)
    side = rng.choice([-1.0, 1.0])
    if name in ("Car", "Van", "Truck"):
        view = "rear" if rng.random() < 0.45 else "side"
        alpha = rng.uniform(-0.25, 0.25) if view == "rear" else side * rng.uniform(0.6, np.pi - 0.6)
        width = h * (real[1] * abs(np.cos(alpha)) + real[2] * abs(np.sin(alpha))) / real[0]
        cx = scene.vp_x + rng.uniform(-1.05, 1.05) * road
    elif name == "Cyclist":
        view = "side"
        alpha = side * rng.uniform(np.arcsin(0.7), np.pi - np.arcsin(0.7))
        width = h * (real[1] * abs(np.cos(alpha)) + real[2] * abs(np.sin(alpha))) / real[0]
        cx = scene.vp_x + side * rng.uniform(0.6, 1.3) * road
    else:
        view = "any"
        alpha = rng.uniform(-np.pi, np.pi)
        width = h * (rng.uniform(0.32, 0.45) if name == "Pedestrian" else rng.uniform(0.55, 0.75))
        crossing = name == "Pedestrian" and rng.random() < 0.3
        cx = scene.vp_x + (rng.uniform(-1, 1) if crossing else side * rng.uniform(0.9, 1.9)) * road
    w_px, h_px = max(3, round(width)), max(4, round(h))
    sprite = _sprite(name, view, w_px, h_px, rng)
    depth = scene.focal * real[0] / h
    x3 = (cx - scene.width / 2) * depth / scene.focal
    ry = alpha + np.arctan2(x3, depth)
    rotation_y = float(np.arctan2(np.sin(ry), np.cos(ry)))  # wrapped to [-pi, pi]
    return _Object(name, sprite, round(cx - w_px / 2), round(bottom - h_px), depth, alpha,
                   real, [x3, CAMERA_HEIGHT, depth], rotation_y)


def _visible_fractions(objects, height, width):
    """Fraction of each object's in-image silhouette left visible when painted far to near."""
    owner = np.full((height, width), -1, dtype=np.int32)
    for i, obj in enumerate(objects):
        crop, ys, xs, _ = obj.mask_in_image(height, width)
        owner[ys, xs][crop] = i
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    total = np.array([obj.mask_in_image(height, width)[0].sum() for obj in objects])
    return visible / np.maximum(total, 1)


def render_scene(rng, height, width, max_objects):
    """One image (uint8 [H, W, 3]) and its KITTI annotations."""
    scene = _Scene(rng, height, width)
    image = _background(rng, scene)
    dont_care = [_dont_care(rng, scene, image) for _ in range(rng.integers(0, 3))]

    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(10):
            obj = _sample_object(rng, scene)
            crop, _, _, outside = obj.mask_in_image(height, width)
            inside = crop.sum()
            rows = np.flatnonzero(crop.any(axis=1))
            if inside > 0 and outside / (inside + outside) <= MAX_TRUNCATION and len(rows) >= 6 * scene.scale:
                objects.append(obj)
                break
    objects.sort(key=lambda o: -o.depth)
    while objects:  # drop the most hidden object until every one is visible enough
        visible = _visible_fractions(objects, height, width)
        worst = int(np.argmin(visible))
        if visible[worst] >= MIN_VISIBLE:
            break
        objects.pop(worst)

    visible = _visible_fractions(objects, height, width) if objects else np.zeros([0])
    annos = {k: [] for k in kitti.empty_annos()}
    for obj, vis in zip(objects, visible):
        crop, ys, xs, outside = obj.mask_in_image(height, width)
        image[ys, xs][crop] = obj.sprite[ys.start - obj.y0:ys.stop - obj.y0,
                                         xs.start - obj.x0:xs.stop - obj.x0][crop][:, :3]
        rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
        # pixel i covers [i, i + 1): the box spans the silhouette's pixels
        box = [xs.start + cols[0], ys.start + rows[0], xs.start + cols[-1] + 1, ys.start + rows[-1] + 1]
        occluded = 0 if vis >= FULLY_VISIBLE else 1 if vis >= PARTLY_VISIBLE else 2
        _append(annos, obj.name, outside / (outside + crop.sum()), occluded, obj.alpha, box,
                obj.dims, obj.location, obj.rotation_y)
    for box in dont_care:  # KITTI's placeholder values for DontCare regions
        _append(annos, "DontCare", -1, -1, -10, box, [-1, -1, -1], [-1000, -1000, -1000], -10)

    gain = rng.uniform(0.85, 1.15)
    noise = rng.normal(0, 1.0, image.shape)
    image = np.clip(image * gain + noise, 0, 255).round().astype(np.uint8)
    return image, _as_arrays(annos)


def _append(annos, name, truncated, occluded, alpha, box, dims, location, rotation_y):
    # round to the precision of the label file so the returned annos equal what is written
    annos["name"].append(name)
    annos["truncated"].append(round(float(truncated), 2))
    annos["occluded"].append(int(occluded))
    annos["alpha"].append(round(float(alpha), 2))
    annos["bbox"].append([float(v) for v in box])
    annos["dimensions"].append([round(float(v), 2) for v in dims])
    annos["location"].append([round(float(v), 2) for v in location])
    annos["rotation_y"].append(round(float(rotation_y), 2))


def _as_arrays(annos):
    empty = kitti.empty_annos()
    return {k: np.array(v, dtype=empty[k].dtype).reshape((-1,) + empty[k].shape[1:]) for k, v in annos.items()}


# ---------------------------------------------------------------- dataset

def _check_args(num_images, height, width, val_fraction, max_objects):
    if num_images < 1:
        raise UserError(f"num_images must be at least 1, got {num_images}")
    if height < 64 or width < 64:
        raise UserError(f"image size must be at least 64 x 64, got {height} x {width}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_objects < 1:
        raise UserError(f"max_objects must be at least 1, got {max_objects}")


def _prepare_root(root, frame_ids):
    """Create the layout; refuse to touch a non-empty directory this module did not write."""
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(os.path.join(root, MARKER)):
        raise UserError(f"{root} exists and was not written by `clock-deploy data synth` (no {MARKER}); "
                        "choose an empty or new directory")
    check_inside(root, *(os.path.join(root, *parts) for parts in (
        ("training",), ("training", "image_2"), ("training", "label_2"), ("ImageSets",))))
    keep = set(frame_ids)
    for folder, ext in (("image_2", ".png"), ("label_2", ".txt")):
        path = os.path.join(root, "training", folder)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise write_error(path, e) from None
        for name in os.listdir(path):  # frames of an earlier, larger run would be stale
            stem, file_ext = os.path.splitext(name)
            if file_ext == ext and stem not in keep:
                os.remove(os.path.join(path, name))


def generate(root, num_images, seed=0, height=188, width=620, val_fraction=0.25, max_objects=8, progress=True):
    """Write a synthetic KITTI-format dataset under `root`; returns a summary with label statistics."""
    _check_args(num_images, height, width, val_fraction, max_objects)
    root = os.fspath(root)
    frame_ids = [f"{i:06d}" for i in range(num_images)]
    _prepare_root(root, frame_ids)
    all_annos = []
    for i, frame_id in enumerate(tqdm(frame_ids, desc="synthesizing", unit="img", disable=not progress)):
        image, annos = render_scene(np.random.default_rng([seed, i]), height, width, max_objects)
        with atomic_path(kitti.image_path(root, frame_id)) as tmp:
            Image.fromarray(image).save(tmp, format="PNG", compress_level=3)
        kitti.write_label(kitti.label_path(root, frame_id), annos)
        all_annos.append(annos)

    num_val = int(round(num_images * val_fraction))
    if val_fraction > 0 and num_images > 1:
        num_val = min(max(num_val, 1), num_images - 1)
    val = set(np.random.default_rng(seed).permutation(num_images)[:num_val].tolist())
    splits = {
        "train": [f for i, f in enumerate(frame_ids) if i not in val],
        "val": [f for i, f in enumerate(frame_ids) if i in val],
        "trainval": frame_ids,
    }
    for name, ids in splits.items():
        kitti.write_split(root, name, ids)

    stats = kitti.label_stats(all_annos)
    params = {"num_images": num_images, "seed": seed, "height": height, "width": width,
              "val_fraction": val_fraction, "max_objects": max_objects}
    counts = {name: row["objects"] for name, row in stats["classes"].items()}
    marker = {"generator": "clock_deploy.data.synthetic", **params, "objects": counts}
    write_text(os.path.join(root, MARKER), json.dumps(marker, indent=2) + "\n")
    return {"root": root, **params, "splits": {k: len(v) for k, v in splits.items()}, "stats": stats}
