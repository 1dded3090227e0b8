"""The embedded toy domain pair: procedurally drawn street scenes in a "game" and a "real" style.

Both domains share one scene model, a pinhole camera looking down a street: a road with lane markings, sidewalks,
optional grass strips, rows of buildings with windows, a far row closing the street, fences and walls, trees,
poles carrying traffic signs or lights, cars, a bus now and then, and people, all placed in metres and projected,
so object sizes follow perspective. What differs:

* **Source ("game", written as GTA5)**: saturated flat colours, sharp edges, regular textures (window grids,
  white lane dashes), a camera whose height, horizon and field of view vary, fewer people, bigger cars.
* **Target ("real", written as Cityscapes)**: muted colours, part of the way (``REALISM``) towards a real palette
  (grey asphalt, paler pavements, dull cars, blue and white signs), multi-scale texture noise, a lighting gradient
  and colour cast, blur, sensor noise, car shadows, the ego vehicle's hood at the bottom (labelId 1, ignored), a
  fixed camera, more and smaller objects (cars, people, poles). Every class keeps its place in colour space: the
  shift moves appearance, as from GTA5 to Cityscapes, and relabels nothing.

The label maps are drawn together with the images (exact, no anti-aliasing), as Cityscapes *labelIds*.

Calibration: ``benchmarks/toy_gap.py`` measures the gap between a small network trained on the source and the
same network trained on the target labels, and ``benchmarks/toy_self_training.py`` what self-training on the
teacher's pseudo labels recovers of it (figures in ``benchmarks/results/``). ``REALISM`` below is the knob.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from uda_sam.data.labels import label_id_palette
from uda_sam.data.transforms import check_size

MANIFEST = "toy_manifest.json"
FORMAT_VERSION = 3  # 2: a labelled test split; 3: classes keep their places in the real palette
TRAIN_CITIES = ("arcadia", "brickton")
VAL_CITIES = ("cobbleford", "dunmore")
TEST_CITIES = ("eastholm", "fairhaven")

# Cityscapes labelIds used by the toy scenes.
EGO, ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = 1, 7, 8, 11, 12, 13, 17
LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, BUS = 19, 20, 21, 22, 23, 24, 26, 28

Color = tuple[float, float, float]


# --------------------------------------------------------------------------------------------- scene model
@dataclass(frozen=True)
class Layout:
    """Distribution of the scene layout of one domain (ranges are uniform ``(low, high)``; metres unless noted)."""

    horizon: tuple[float, float]  # fraction of the image height
    vanishing_x: tuple[float, float]  # fraction of the image width
    focal: tuple[float, float]  # fraction of the image width
    camera_height: tuple[float, float]
    road_half_width: tuple[float, float]
    camera_offset: tuple[float, float]  # lateral camera position, as a fraction of the road half width
    sidewalk_width: tuple[float, float]
    terrain_prob: float
    terrain_width: tuple[float, float]
    building_height: tuple[float, float]
    building_length: tuple[float, float]
    gap_prob: float
    cars: tuple[int, int]
    car_scale: tuple[float, float]
    bus_prob: float
    persons: tuple[int, int]
    person_height: tuple[float, float]
    trees: tuple[int, int]
    poles: tuple[int, int]
    fence_prob: float
    wall_prob: float
    ego_hood: bool


GAME_LAYOUT = Layout(
    horizon=(0.34, 0.5),
    vanishing_x=(0.38, 0.62),
    focal=(0.6, 0.9),
    camera_height=(1.3, 1.9),
    road_half_width=(4.0, 7.5),
    camera_offset=(-0.5, 0.5),
    sidewalk_width=(2.0, 4.5),
    terrain_prob=0.4,
    terrain_width=(1.5, 4.0),
    building_height=(6.0, 22.0),
    building_length=(6.0, 16.0),
    gap_prob=0.15,
    cars=(1, 5),
    car_scale=(1.0, 1.25),
    bus_prob=0.2,
    persons=(0, 4),
    person_height=(1.7, 2.0),
    trees=(1, 6),
    poles=(2, 5),
    fence_prob=0.4,
    wall_prob=0.3,
    ego_hood=False,
)

REAL_LAYOUT = Layout(
    horizon=(0.38, 0.46),
    vanishing_x=(0.44, 0.56),
    focal=(0.75, 0.95),
    camera_height=(1.4, 1.6),
    road_half_width=(3.5, 6.5),
    camera_offset=(-0.4, 0.4),
    sidewalk_width=(2.0, 4.0),
    terrain_prob=0.3,
    terrain_width=(1.0, 3.0),
    building_height=(8.0, 26.0),
    building_length=(5.0, 14.0),
    gap_prob=0.1,
    cars=(2, 8),
    car_scale=(0.85, 1.05),
    bus_prob=0.1,
    persons=(1, 7),
    person_height=(1.55, 1.9),
    trees=(0, 5),
    poles=(3, 7),
    fence_prob=0.3,
    wall_prob=0.4,
    ego_hood=True,
)


@dataclass(frozen=True)
class Style:
    """Colours (RGB 0-255) and post-processing of one domain's renderer."""

    sky: tuple[Color, ...]
    building: tuple[Color, ...]
    window: tuple[Color, ...]
    road: tuple[Color, ...]
    lane: Color
    sidewalk: tuple[Color, ...]
    curb: Color
    terrain: tuple[Color, ...]
    vegetation: tuple[Color, ...]
    trunk: Color
    fence: tuple[Color, ...]
    wall: tuple[Color, ...]
    pole: tuple[Color, ...]
    sign: tuple[Color, ...]
    light: Color
    car: tuple[Color, ...]
    car_window: Color
    bus: tuple[Color, ...]
    clothes: tuple[Color, ...]
    skin: tuple[Color, ...]
    hood: Color
    jitter: float  # per-instance colour jitter
    realistic: bool  # texture noise, lighting, blur, sensor noise, shadows


GAME_STYLE = Style(
    sky=((80, 160, 245), (100, 175, 250)),
    building=((190, 105, 70), (205, 190, 120), (170, 160, 150), (150, 110, 140)),
    window=((40, 60, 115), (30, 45, 90)),
    road=((58, 58, 66),),
    lane=(245, 245, 245),
    sidewalk=((178, 172, 160),),
    curb=(205, 200, 190),
    terrain=((160, 200, 70),),
    vegetation=((40, 160, 45), (30, 130, 40)),
    trunk=(110, 70, 35),
    fence=((145, 95, 45),),
    wall=((165, 155, 140),),
    pole=((120, 120, 128),),
    sign=((240, 210, 20), (225, 40, 35)),
    light=(35, 35, 35),
    car=((210, 30, 30), (30, 70, 210), (230, 200, 30), (30, 170, 70), (235, 235, 235), (40, 40, 45)),
    car_window=(20, 30, 60),
    bus=((235, 160, 20),),
    clothes=((220, 40, 160), (40, 200, 220), (240, 120, 20), (120, 40, 220), (40, 220, 60), (50, 50, 60)),
    skin=((235, 190, 150),),
    hood=(0, 0, 0),
    jitter=12.0,
    realistic=False,
)

_REAL_PALETTE = Style(
    sky=((100, 155, 228), (125, 170, 228), (150, 185, 225)),
    building=((160, 110, 90), (115, 125, 150), (175, 165, 125), (150, 150, 155), (98, 92, 90)),
    window=((62, 70, 80), (90, 98, 110), (150, 140, 110)),
    road=((96, 94, 98), (84, 84, 88)),
    lane=(185, 182, 178),
    sidewalk=((150, 142, 134), (138, 132, 128)),
    curb=(130, 128, 125),
    terrain=((140, 170, 80), (125, 150, 75)),
    vegetation=((60, 130, 50), (50, 110, 45)),
    trunk=(60, 50, 40),
    fence=((150, 150, 146),),
    wall=((178, 168, 150),),
    pole=((72, 72, 74),),
    sign=((45, 82, 165), (230, 230, 230)),
    light=(20, 20, 22),
    car=((70, 70, 75), (190, 190, 195), (30, 30, 35), (45, 55, 120), (170, 40, 40), (40, 70, 170)),
    car_window=(35, 40, 45),
    bus=((200, 200, 205), (170, 50, 45)),
    clothes=((40, 40, 48), (70, 60, 55), (95, 100, 160), (170, 40, 60), (150, 150, 150), (60, 150, 170)),
    skin=((200, 160, 130), (150, 110, 85)),
    hood=(30, 32, 36),
    jitter=14.0,
    realistic=True,
)


#: How far each "real" colour moves from the game colour of the same class (0 = game palette, 1 = the real palette
#: above), the calibration knob of the gap. No class moves into another's place: a toy whose road took the game
#: sidewalk's colour and the reverse (the first toys) makes the source model confidently wrong on whole classes, a
#: shift GTA5 -> Cityscapes does not have, and self-training then only repeats those errors.
REALISM = 0.6


def _blend(game: Style, real: Style, realism: float) -> Style:
    def mix(g, r):
        if not isinstance(g, tuple):
            return r
        if isinstance(r[0], (int, float)):
            return tuple(round(gv + realism * (rv - gv), 1) for gv, rv in zip(g, r, strict=True))
        return tuple(mix(g[i % len(g)], c) for i, c in enumerate(r))

    values = {f: mix(getattr(game, f), getattr(real, f)) for f in Style.__dataclass_fields__}
    values.update(jitter=real.jitter, realistic=real.realistic)
    return Style(**values)


REAL_STYLE = _blend(GAME_STYLE, _REAL_PALETTE, REALISM)


class _Camera:
    """Pinhole camera over flat ground: world X right, Y up from the ground, Z forward (metres)."""

    def __init__(self, width: int, height: int, rng: np.random.Generator, layout: Layout) -> None:
        self.width, self.height = width, height
        self.focal = width * rng.uniform(*layout.focal)
        self.vx = width * rng.uniform(*layout.vanishing_x)
        self.vy = height * rng.uniform(*layout.horizon)
        self.cam_h = rng.uniform(*layout.camera_height)

    def project(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """World points -> (N, 2) pixel coordinates."""
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
        return np.stack([self.vx + self.focal * x / z, self.vy + self.focal * (self.cam_h - y) / z], axis=-1)

    def scale(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.focal / z


_SHIFT = 2  # sub-pixel bits for cv2 drawing


class _Canvas:
    """Draws each primitive into the image and the labelId map at once."""

    def __init__(self, width: int, height: int) -> None:
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)
        self.shade = np.ones((height, width), np.float32)

    @staticmethod
    def _pts(polys: Sequence[np.ndarray]) -> list[np.ndarray]:
        limit = 1 << 20  # keep far off-screen vertices inside cv2's coordinate range
        return [np.round(np.clip(p, -limit, limit) * (1 << _SHIFT)).astype(np.int32) for p in polys]

    def polys(self, polys: Sequence[np.ndarray], label: int | None, color: Color) -> None:
        pts = self._pts(polys)
        cv2.fillPoly(self.image, pts, color, lineType=cv2.LINE_8, shift=_SHIFT)
        if label is not None:
            cv2.fillPoly(self.label, pts, int(label), lineType=cv2.LINE_8, shift=_SHIFT)

    def ellipse(self, center: np.ndarray, axes: tuple[float, float], label: int, color: Color) -> None:
        c = tuple(int(round(v * (1 << _SHIFT))) for v in center)
        a = tuple(max(1, int(round(v * (1 << _SHIFT)))) for v in axes)
        cv2.ellipse(self.image, c, a, 0, 0, 360, color, -1, cv2.LINE_8, _SHIFT)
        cv2.ellipse(self.label, c, a, 0, 0, 360, int(label), -1, cv2.LINE_8, _SHIFT)

    def shadow(self, polys: Sequence[np.ndarray], factor: float) -> None:
        cv2.fillPoly(self.shade, self._pts(polys), float(factor), lineType=cv2.LINE_8, shift=_SHIFT)

    def apply_shade(self) -> None:
        self.image *= self.shade[:, :, None]
        self.shade.fill(1.0)


class _Painter:
    """Lays out one street scene and draws it in one style."""

    def __init__(
        self, rng: np.random.Generator, width: int, height: int, layout: Layout, style: Style
    ) -> None:
        self.rng, self.layout, self.style = rng, layout, style
        self.cam = _Camera(width, height, rng, layout)
        self.canvas = _Canvas(width, height)
        self.z_near = 0.5
        self.z_far = float(rng.uniform(70.0, 140.0))

    # -- colours
    def color(self, palette: Sequence[Color] | Color) -> Color:
        base = palette if isinstance(palette[0], (int, float)) else palette[self.rng.integers(len(palette))]
        jitter = self.rng.normal(0.0, self.style.jitter, 3) + self.rng.normal(0.0, self.style.jitter / 2)
        return tuple(float(np.clip(b + j, 0, 255)) for b, j in zip(base, jitter, strict=True))  # type: ignore[return-value]

    # -- primitives in world coordinates
    def ground_quad(self, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
        return self.cam.project([x0, x1, x1, x0], 0.0, [z0, z0, z1, z1])

    def side_face(self, x: float, z0: float, z1: float, y0: float, y1: float) -> np.ndarray:
        return self.cam.project(x, [y0, y0, y1, y1], [z0, z1, z1, z0])

    def front_face(self, x0: float, x1: float, y0: float, y1: float, z: float) -> np.ndarray:
        return self.cam.project([x0, x1, x1, x0], [y0, y0, y1, y1], z)

    # -- scene
    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        rng, lay, st, cv = self.rng, self.layout, self.style, self.canvas
        half = rng.uniform(*lay.road_half_width)
        offset = rng.uniform(*lay.camera_offset) * half
        road = (-half - offset, half - offset)
        sides = []
        for sign, edge in ((-1, road[0]), (1, road[1])):
            walk = rng.uniform(*lay.sidewalk_width)
            grass = rng.uniform(*lay.terrain_width) if rng.random() < lay.terrain_prob else 0.0
            sides.append((sign, edge, edge + sign * walk, edge + sign * (walk + grass)))

        cv.polys(
            [
                np.array(
                    [
                        [0, 0],
                        [cv.image.shape[1], 0],
                        [cv.image.shape[1], self.cam.vy + 1],
                        [0, self.cam.vy + 1],
                    ]
                )
            ],
            SKY,
            self.color(st.sky),
        )
        if st.realistic:  # brighter sky towards the horizon
            rows = np.clip(np.arange(cv.image.shape[0]) / max(self.cam.vy, 1.0), 0, 1)[:, None, None]
            cv.image[:] = cv.image * (0.85 + 0.25 * rows)
        self._far_row()
        wide = 400.0  # the ground beyond the buildings (seen through gaps)
        cv.polys([self.ground_quad(-wide, wide, self.z_near, self.z_far)], TERRAIN, self.color(st.terrain))
        cv.polys([self.ground_quad(road[0], road[1], self.z_near, self.z_far)], ROAD, self.color(st.road))
        self._lanes(road)
        for sign, edge, walk_edge, grass_edge in sides:
            lo, hi = sorted((edge, walk_edge))
            cv.polys([self.ground_quad(lo, hi, self.z_near, self.z_far)], SIDEWALK, self.color(st.sidewalk))
            curb = sorted((edge, edge + sign * 0.25))
            cv.polys([self.ground_quad(curb[0], curb[1], self.z_near, self.z_far)], SIDEWALK, st.curb)
            if grass_edge != walk_edge:
                lo, hi = sorted((walk_edge, grass_edge))
                cv.polys([self.ground_quad(lo, hi, self.z_near, self.z_far)], TERRAIN, self.color(st.terrain))

        objects = self._objects(road, sides)
        if st.realistic:
            for kind, x, z, w in objects:
                if kind in ("car", "bus"):
                    cv.shadow([self.ground_quad(x - w * 0.6, x + w * 0.6, z - 0.4, z + 3.5)], 0.55)
            cv.apply_shade()
        for sign, _, _, grass_edge in sides:
            self._facades(sign, grass_edge)
            self._barrier(sign, grass_edge)
        for kind, x, z, w in sorted(objects, key=lambda o: -o[2]):
            getattr(self, f"_{kind}")(x, z, w)
        if lay.ego_hood:
            self._hood()
        return self._finish()

    def _far_row(self) -> None:
        st, cv = self.style, self.canvas
        x = -200.0
        while x < 200.0:
            length = self.rng.uniform(8.0, 25.0)
            height = self.rng.uniform(*self.layout.building_height)
            cv.polys(
                [self.front_face(x, x + length, 0.0, height, self.z_far)], BUILDING, self.color(st.building)
            )
            x += length

    def _lanes(self, road: tuple[float, float]) -> None:
        centre = (road[0] + road[1]) / 2
        z, quads = 2.0, []
        period, dash = self.rng.uniform(7.0, 11.0), self.rng.uniform(2.0, 4.0)
        while z < self.z_far:
            quads.append(self.ground_quad(centre - 0.08, centre + 0.08, z, z + dash))
            z += period
        self.canvas.polys(quads, ROAD, self.style.lane)

    def _facades(self, sign: int, x: float) -> None:
        rng, lay, st, cv = self.rng, self.layout, self.style, self.canvas
        segments = []
        z = self.z_near
        while z < self.z_far:
            length = rng.uniform(*lay.building_length)
            segments.append((z, min(z + length, self.z_far), rng.random() < lay.gap_prob))
            z += length
        for z0, z1, gap in reversed(segments):  # far to near
            if gap:
                continue
            height = rng.uniform(*lay.building_height)
            cv.polys([self.side_face(x, z0, z1, 0.0, height)], BUILDING, self.color(st.building))
            floor, column = rng.uniform(2.8, 3.6), rng.uniform(2.5, 4.0)
            win_w, win_h = column * rng.uniform(0.35, 0.6), floor * rng.uniform(0.35, 0.55)
            windows = []
            for y in np.arange(floor * 0.6, height - floor * 0.6, floor):
                for zc in np.arange(z0 + column * 0.5, z1 - column * 0.5, column):
                    windows.append(self.side_face(x, zc, zc + win_w, y, y + win_h))
            if windows:
                if st.realistic:  # windows in several tones (lit, reflecting, dark)
                    groups = rng.integers(0, len(st.window), len(windows))
                    for g in range(len(st.window)):
                        chosen = [w for w, k in zip(windows, groups, strict=True) if k == g]
                        if chosen:
                            cv.polys(chosen, BUILDING, self.color(st.window[g]))
                else:
                    cv.polys(windows, BUILDING, self.color(st.window))

    def _barrier(self, sign: int, x: float) -> None:
        rng, lay, st, cv = self.rng, self.layout, self.style, self.canvas
        for label, prob, palette, height in (
            (FENCE, lay.fence_prob, st.fence, (0.9, 1.6)),
            (WALL, lay.wall_prob, st.wall, (0.6, 1.4)),
        ):
            if rng.random() >= prob:
                continue
            z0 = rng.uniform(self.z_near, 25.0)
            z1 = min(z0 + rng.uniform(8.0, 40.0), self.z_far)
            top = rng.uniform(*height)
            xb = x - sign * 0.3
            color = self.color(palette)
            cv.polys([self.side_face(xb, z0, z1, 0.0, top)], label, color)
            if label == FENCE:  # lattice: darker rails and posts, same label
                dark = tuple(c * 0.6 for c in color)
                posts = [self.side_face(xb, zz, zz + 0.12, 0.0, top) for zz in np.arange(z0, z1, 2.0)]
                rails = [self.side_face(xb, z0, z1, yy, yy + 0.08) for yy in (top * 0.3, top * 0.9)]
                cv.polys(posts + rails, FENCE, dark)  # type: ignore[arg-type]

    def _objects(self, road: tuple[float, float], sides: list) -> list[tuple[str, float, float, float]]:
        rng, lay = self.rng, self.layout
        objects: list[tuple[str, float, float, float]] = []
        lanes = np.linspace(road[0] + 1.4, road[1] - 1.4, max(2, int((road[1] - road[0]) // 3)))
        for _ in range(rng.integers(lay.cars[0], lay.cars[1] + 1)):
            scale = rng.uniform(*lay.car_scale)
            objects.append(
                ("car", float(rng.choice(lanes) + rng.normal(0, 0.3)), rng.uniform(3.5, 60.0), 1.8 * scale)
            )
        if rng.random() < lay.bus_prob:
            objects.append(("bus", float(rng.choice(lanes)), rng.uniform(10.0, 50.0), 2.6))
        for _ in range(rng.integers(lay.persons[0], lay.persons[1] + 1)):
            sign, edge, walk_edge, _ = sides[rng.integers(2)]
            objects.append(
                (
                    "person",
                    rng.uniform(min(edge, walk_edge), max(edge, walk_edge)),
                    rng.uniform(3.0, 45.0),
                    rng.uniform(*lay.person_height),
                )
            )
        for _ in range(rng.integers(lay.trees[0], lay.trees[1] + 1)):
            sign, _, walk_edge, grass_edge = sides[rng.integers(2)]
            x = (walk_edge + grass_edge) / 2 if grass_edge != walk_edge else walk_edge - sign * 0.8
            objects.append(("tree", x, rng.uniform(4.0, 70.0), rng.uniform(1.5, 3.2)))
        for _ in range(rng.integers(lay.poles[0], lay.poles[1] + 1)):
            sign, edge, _, _ = sides[rng.integers(2)]
            objects.append(("pole", edge + sign * 0.5, rng.uniform(4.0, 70.0), rng.uniform(4.0, 8.0)))
        return objects

    def _car(self, x: float, z: float, width: float) -> None:
        st, cv = self.style, self.canvas
        height, length = width * 0.8, width * 2.4
        body = self.color(st.car)
        side_x = x - width / 2 if x > 0 else x + width / 2  # the side facing the camera
        cv.polys(
            [self.side_face(side_x, z, z + length, 0.25, height * 0.55)], CAR, tuple(c * 0.8 for c in body)
        )
        cv.polys(
            [self.side_face(side_x, z + length * 0.2, z + length * 0.8, height * 0.55, height)],
            CAR,
            tuple(c * 0.75 for c in body),
        )
        cv.polys([self.front_face(x - width / 2, x + width / 2, 0.25, height * 0.55, z)], CAR, body)
        cab = self.front_face(x - width * 0.4, x + width * 0.4, height * 0.55, height, z + length * 0.2)
        cv.polys([cab], CAR, body)
        glass = self.front_face(
            x - width * 0.33, x + width * 0.33, height * 0.6, height * 0.93, z + length * 0.2
        )
        cv.polys([glass], CAR, st.car_window)
        for wx in (x - width * 0.35, x + width * 0.35):
            cv.polys([self.front_face(wx - 0.18, wx + 0.18, 0.0, 0.35, z)], CAR, (15.0, 15.0, 15.0))
        lamp = (235.0, 60.0, 40.0) if not st.realistic else (150.0, 40.0, 35.0)
        for lx in (x - width * 0.42, x + width * 0.32):
            cv.polys([self.front_face(lx, lx + width * 0.1, height * 0.4, height * 0.5, z - 0.01)], CAR, lamp)

    def _bus(self, x: float, z: float, width: float) -> None:
        st, cv = self.style, self.canvas
        height, length = 3.2, 11.0
        body = self.color(st.bus)
        side_x = x - width / 2 if x > 0 else x + width / 2
        cv.polys([self.side_face(side_x, z, z + length, 0.3, height)], BUS, tuple(c * 0.85 for c in body))
        cv.polys([self.front_face(x - width / 2, x + width / 2, 0.3, height, z)], BUS, body)
        cv.polys(
            [self.front_face(x - width * 0.42, x + width * 0.42, height * 0.5, height * 0.9, z - 0.01)],
            BUS,
            st.car_window,
        )
        windows = [
            self.side_face(side_x, zz, zz + 1.2, height * 0.5, height * 0.85)
            for zz in np.arange(z + 1, z + length - 1, 1.6)
        ]
        cv.polys(windows, BUS, st.car_window)

    def _person(self, x: float, z: float, height: float) -> None:
        st, cv = self.style, self.canvas
        shirt, trousers, skin = self.color(st.clothes), self.color(st.clothes), self.color(st.skin)
        w = height * 0.26
        for lx in (x - w * 0.45, x + w * 0.1):
            cv.polys([self.front_face(lx, lx + w * 0.35, 0.0, height * 0.48, z)], PERSON, trousers)
        cv.polys([self.front_face(x - w / 2, x + w / 2, height * 0.46, height * 0.82, z)], PERSON, shirt)
        for ax in (x - w * 0.68, x + w * 0.5):
            cv.polys([self.front_face(ax, ax + w * 0.18, height * 0.5, height * 0.8, z)], PERSON, shirt)
        head = self.cam.project(x, height * 0.91, z)
        radius = self.cam.scale(z) * height * 0.085
        cv.ellipse(head, (radius, radius * 1.15), PERSON, skin)

    def _tree(self, x: float, z: float, radius: float) -> None:
        st, cv = self.style, self.canvas
        trunk_h = radius * 1.2
        cv.polys([self.front_face(x - 0.15, x + 0.15, 0.0, trunk_h + radius * 0.5, z)], VEGETATION, st.trunk)
        px = self.cam.scale(z)
        green = self.color(st.vegetation)
        blobs = 1 if not self.style.realistic else 3
        for _ in range(blobs):
            dx, dy = self.rng.normal(0, radius * 0.25, 2) if blobs > 1 else (0.0, 0.0)
            centre = self.cam.project(x + dx, trunk_h + radius + dy, z)
            cv.ellipse(centre, (radius * px, radius * px * 0.9), VEGETATION, green)

    def _pole(self, x: float, z: float, height: float) -> None:
        rng, st, cv = self.rng, self.style, self.canvas
        cv.polys([self.front_face(x - 0.09, x + 0.09, 0.0, height, z)], POLE, self.color(st.pole))
        kind = rng.random()
        if kind < 0.45:  # traffic sign
            size = rng.uniform(0.6, 0.9)
            y = rng.uniform(2.2, min(height, 3.5) - 0.1)
            color = self.color(st.sign)
            if rng.random() < 0.5:
                cv.polys([self.front_face(x - size / 2, x + size / 2, y - size, y, z - 0.05)], SIGN, color)
            else:
                cv.ellipse(
                    self.cam.project(x, y - size / 2, z - 0.05),
                    (self.cam.scale(z) * size / 2,) * 2,
                    SIGN,
                    color,
                )
        elif kind < 0.8:  # traffic light
            w, h = 0.35, 0.95
            y = height - 0.2
            cv.polys([self.front_face(x - w / 2, x + w / 2, y - h, y, z - 0.05)], LIGHT, st.light)
            lamp = [(230.0, 40.0, 30.0), (240.0, 190.0, 30.0), (40.0, 210.0, 80.0)][rng.integers(3)]
            cy = y - h * (0.2 + 0.3 * rng.integers(3))
            cv.ellipse(self.cam.project(x, cy, z - 0.06), (self.cam.scale(z) * 0.1,) * 2, LIGHT, lamp)

    def _hood(self) -> None:
        cv = self.canvas
        h, w = cv.image.shape[:2]
        top = h * self.rng.uniform(0.86, 0.9)
        xs = np.linspace(-0.1 * w, 1.1 * w, 24)
        ys = top + (h - top) * 0.8 * ((xs - w / 2) / (0.6 * w)) ** 2
        poly = np.concatenate([np.stack([xs, ys], 1), [[1.1 * w, h + 2], [-0.1 * w, h + 2]]])
        cv.polys([poly], EGO, self.color((self.style.hood,)))

    def _finish(self) -> tuple[np.ndarray, np.ndarray]:
        image = self.canvas.image
        if self.style.realistic:
            image = _realistic(image, self.canvas.label, self.rng)
        else:  # the game's time of day: one global brightness/contrast per image, no texture
            tint = 1.0 + self.rng.normal(0.0, 0.04, 3)
            image = (
                (image - 128.0) * self.rng.uniform(0.85, 1.1) + 128.0 * self.rng.uniform(0.85, 1.1)
            ) * tint
            # simple texture: a little uniform grain, the same on every surface
            image = image + self.rng.normal(0.0, 4.0, image.shape).astype(np.float32)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), self.canvas.label


_TEXTURE = {VEGETATION: 0.3, TERRAIN: 0.2, ROAD: 0.08, SIDEWALK: 0.15, BUILDING: 0.1, WALL: 0.12, SKY: 0.04}


def _noise(rng: np.random.Generator, height: int, width: int, cells: Sequence[int]) -> np.ndarray:
    """Multi-octave value noise in about [-1, 1]."""
    out = np.zeros((height, width), np.float32)
    for i, c in enumerate(cells):
        grid = rng.standard_normal((max(2, c * height // width), c)).astype(np.float32)
        out += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC) / (1.6**i)
    return out / 2.0


def _realistic(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = label.shape
    amplitude = np.zeros(256, np.float32)
    for label_id, amp in _TEXTURE.items():
        amplitude[label_id] = amp
    amp = amplitude[label][:, :, None]
    coarse = _noise(rng, height, width, (8, 24, 64))[:, :, None]
    fine = rng.standard_normal((height, width, 1)).astype(np.float32) * 0.5
    image = image * (1.0 + amp * (coarse + fine))
    # Lighting: a brightness gradient in a random direction, a vignette and a colour cast.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * rng.uniform(0.2, 0.5)
    vignette = 1.0 - 0.25 * (((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2) / 0.5)
    cast = 1.0 + rng.normal(0, 0.05, 3).astype(np.float32)
    image = image * ((1.0 + ramp) * vignette)[:, :, None] * cast * rng.uniform(0.8, 1.1)
    sigma = rng.uniform(0.5, 1.0) * max(1.0, width / 512)
    image = cv2.GaussianBlur(image, (0, 0), sigma)
    return image + rng.normal(0, 4.0, image.shape).astype(np.float32)


def render_scene(
    seed: int | Sequence[int], size: Sequence[int], domain: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one toy street scene.

    Args:
        seed: seed (or seed sequence) of this scene's random generator.
        size: ``(width, height)`` in pixels.
        domain: ``"source"`` (game style, GTA5-like layout) or ``"target"`` (real style, Cityscapes-like layout).

    Returns:
        ``(image, label)``: uint8 RGB (H, W, 3) and uint8 Cityscapes labelIds (H, W).
    """
    width, height = check_size(size, "size")  # type: ignore[misc]
    if domain == "source":
        layout, style = GAME_LAYOUT, GAME_STYLE
    elif domain == "target":
        layout, style = REAL_LAYOUT, REAL_STYLE
    else:
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    rng = np.random.default_rng(seed)
    return _Painter(rng, width, height, layout, style).draw()


# ------------------------------------------------------------------------------------------------ writing
def _write_png_rgb(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def _write_gta5(root: Path, count: int, size: tuple[int, int], seed: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    palette = label_id_palette()
    for i in range(count):
        image, label = render_scene((seed, 0, i), size, "source")
        name = f"{i + 1:05d}.png"
        _write_png_rgb(root / "images" / name, image)
        pal = Image.fromarray(label, mode="P")
        pal.putpalette(palette)
        pal.save(root / "labels" / name)


def _write_cityscapes(
    root: Path, split: str, cities: Sequence[str], count: int, size: tuple[int, int], seed: int, stream: int
) -> None:
    for i in range(count):
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19:06d}"
        image_dir = root / "leftImg8bit" / split / city
        label_dir = root / "gtFine" / split / city
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        image, label = render_scene((seed, stream, i), size, "target")
        _write_png_rgb(image_dir / f"{stem}_leftImg8bit.png", image)
        Image.fromarray(label, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")


def make_toy_data(
    root: str | Path,
    num_source: int = 200,
    num_target_train: int = 200,
    num_val: int = 50,
    num_test: int = 100,
    size: Sequence[int] = (256, 128),
    source_size: Sequence[int] | None = (288, 160),
    seed: int = 0,
) -> Path:
    """Write the toy domain pair in the GTA5 and Cityscapes on-disk formats.

    Output::

        root/toy_manifest.json                 # generation parameters; marks a finished set
        root/gta5/images/00001.png ...         # source, RGB
        root/gta5/labels/00001.png ...         # palette PNG, indices = Cityscapes labelIds
        root/cityscapes/leftImg8bit/{train,val,test}/<city>/<city>_<seq:06>_000019_leftImg8bit.png
        root/cityscapes/gtFine/{train,val,test}/<city>/<city>_<seq:06>_000019_gtFine_labelIds.png   # uint8 'L'

    Unlike Cityscapes, the toy's ``test`` split is labelled: other scenes (and city names) than ``val``, drawn by the
    same generator, for reporting results on images that no setting was chosen on (``data.test_split: test``).

    Generation is deterministic in its arguments. The set is written to a temporary sibling folder and renamed
    into place when complete, so an interrupted run leaves nothing half-written at ``root``. Calling again with
    the same parameters on a finished set returns at once.

    Args:
        root: output folder; must not exist, be empty, or hold a toy set made with the same parameters.
        num_source: number of source (game) images.
        num_target_train: number of target (real) training images (with labels, for oracle runs).
        num_val: number of target validation images.
        num_test: number of labelled target test images.
        size: ``(width, height)`` of the target images.
        source_size: ``(width, height)`` of the source images (``None`` = ``size``).
        seed: base seed; each image has its own generator derived from ``(seed, stream, index)``.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid counts or sizes, or ``root`` holds a toy set made with other parameters.
        FileExistsError: ``root`` is a non-empty folder that is not a finished toy set (or is a file).
    """
    for name, value in (
        ("num_source", num_source),
        ("num_target_train", num_target_train),
        ("num_val", num_val),
        ("num_test", num_test),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    target_wh = check_size(size, "size")
    source_wh = check_size(source_size, "source_size") or target_wh
    assert target_wh is not None and source_wh is not None
    for name, (w, h) in (("size", target_wh), ("source_size", source_wh)):
        if w < 32 or h < 16:
            raise ValueError(f"{name} must be at least 32x16 pixels, got {w}x{h}")
    params = {
        "format_version": FORMAT_VERSION,
        "num_source": num_source,
        "num_target_train": num_target_train,
        "num_val": num_val,
        "num_test": num_test,
        "size": list(target_wh),
        "source_size": list(source_wh),
        "seed": seed,
    }

    root = Path(root)
    manifest = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise FileExistsError(
            f"toy data root {root} is a file; expected a folder (absent, empty or a toy set)"
        )
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text()).get("parameters")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{manifest} is not a valid toy manifest; remove {root} to regenerate") from err
        if existing == params:
            return root
        raise ValueError(
            f"{root} holds a toy set made with other parameters ({existing}); choose another root or delete it "
            f"to generate {params}"
        )
    if root.is_dir() and any(root.iterdir()):
        raise FileExistsError(
            f"toy data root {root} is a non-empty folder without {MANIFEST}; refusing to write into it"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _write_gta5(tmp / "gta5", num_source, source_wh, seed)
        cityscapes = tmp / "cityscapes"
        _write_cityscapes(cityscapes, "train", TRAIN_CITIES, num_target_train, target_wh, seed, stream=1)
        _write_cityscapes(cityscapes, "val", VAL_CITIES, num_val, target_wh, seed, stream=2)
        _write_cityscapes(cityscapes, "test", TEST_CITIES, num_test, target_wh, seed, stream=3)
        info = {
            "parameters": params,
            "source": {"format": "gta5", "path": "gta5", "layout": asdict(GAME_LAYOUT)},
            "target": {
                "format": "cityscapes",
                "path": "cityscapes",
                "train_cities": TRAIN_CITIES,
                "val_cities": VAL_CITIES,
                "test_cities": TEST_CITIES,
                "layout": asdict(REAL_LAYOUT),
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
        if root.is_dir():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
