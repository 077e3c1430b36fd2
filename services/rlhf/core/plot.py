"""A tiny line-chart renderer that writes PNG with the standard library only (zlib + struct).

Why not matplotlib: the demo needs one figure of a few lines, and matplotlib (with its compiled dependencies) would be
the package's largest dependency for it. This draws stacked panels, each with a frame, a y range, tick labels and a
title in a 5x7 bitmap font, polylines, and dashed reference lines (horizontal, or vertical markers of events such as
a model version change); nothing more.
"""
from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (200, 200, 200)
PALETTE: tuple[Color, ...] = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))

# 5x7 glyphs, one string of 7 rows per character ('#' = ink). Lower case is drawn as upper case.
_FONT_ROWS = {
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...#####.#...##...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "####.#...##...##...##...##...#####.",
    "E": "######....####.#....#....#....#####", "F": "######....####.#....#....#....#....",
    "G": ".###.#...##....#.####...##...#.###.", "H": "#...##...#######...##...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "J": "..###...#....#....#....##..#.##...",
    "K": "#...##..#.###..#.#..#..#.#...##...#", "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##...##...##...##...#", "N": "#...###..##.#.##..###...##...##...#",
    "O": ".###.#...##...##...##...##...#.###.", "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#", "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".####.....#.....###.....#....#####.", "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.", "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.", "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..", "Z": "#####....#...#...#...#...#....#####",
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "#####...#...#.....#....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    ".": "..........................##...##..", "-": "...............###.................",
    "+": ".......#....#..#####..#....#.......", ":": ".....##...##.......##...##.........",
    "(": "...#...#...#....#....#.....#.....#.", ")": ".#.....#.....#....#....#...#...#...",
    "/": ".........#...#...#...#...#........", "%": "##...##..#...#...#...#...#..##...##",
    "=": "..........#####.....#####..........", ",": ".....................##...#...#....",
    " ": "." * 35, "_": "." * 30 + "#####",
}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """An RGB raster with the few drawing operations the charts need."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """The outline of the rectangle with corners (x0, y0), (x1, y1)."""
        self.line(x0, y0, x1, y0, color)
        self.line(x0, y1, x1, y1, color)
        self.line(x0, y0, x0, y1, color)
        self.line(x1, y0, x1, y1, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1) -> None:
        """A straight segment (sampled densely; thick lines are a square brush)."""
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        half = width // 2
        for s in range(steps + 1):
            t = s / steps
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(-half, width - half):
                for dy in range(-half, width - half):
                    self.set(x + dx, y + dy, color)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 1) -> None:
        """``text`` with its top-left corner at (x, y); unknown characters are drawn as blanks."""
        for k, ch in enumerate(text.upper()):
            rows = _FONT_ROWS.get(ch, _FONT_ROWS[" "])
            for i, ink in enumerate(rows):
                if ink == "#":
                    gx, gy = i % GLYPH_W, i // GLYPH_W
                    for sx in range(scale):
                        for sy in range(scale):
                            self.set(x + (k * (GLYPH_W + 1) + gx) * scale + sx, y + gy * scale + sy, color)

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: Color | None = None


@dataclass(frozen=True)
class Marker:
    """A dashed vertical line at ``x`` (an event: e.g. the time a new model version was first served)."""

    x: float
    label: str = ""
    """Drawn beside the foot of the line, inside the panel (the legend is at the top); empty for none."""
    color: Color = (120, 120, 120)


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    hline: float | None = None
    """A dashed horizontal reference line (e.g. the KL budget)."""
    markers: list[Marker] = field(default_factory=list)
    """Dashed vertical lines; their x values widen the shared x axis when they fall outside the series."""


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def render_panels(panels: Sequence[Panel], x_label: str = "", width: int = 640, panel_height: int = 200) -> bytes:
    """Stacked line-chart panels sharing one x axis; returns PNG bytes."""
    margin_l, margin_r, margin_t, margin_b = 60, 20, 24, 18
    height = len(panels) * (panel_height + margin_t + margin_b) + 20
    canvas = Canvas(width, height)
    xs = [v for p in panels for s in p.series for v in _finite(s.x)]
    xs += _finite([m.x for p in panels for m in p.markers])
    x_min, x_max = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_max == x_min:
        x_max = x_min + 1
    for n, panel in enumerate(panels):
        top = n * (panel_height + margin_t + margin_b) + margin_t
        left, right, bottom = margin_l, width - margin_r, top + panel_height
        ys = [v for s in panel.series for v in _finite(s.y)] + ([panel.hline] if panel.hline is not None else [])
        y_min, y_max = (min(ys), max(ys)) if ys else (0.0, 1.0)
        pad = 0.05 * (y_max - y_min or 1.0)
        y_min, y_max = y_min - pad, y_max + pad

        def px(x: float) -> float:
            return left + (x - x_min) / (x_max - x_min) * (right - left)

        def py(y: float) -> float:
            return bottom - (y - y_min) / (y_max - y_min) * (bottom - top)

        # 1. frame, grid and tick labels
        canvas.rect(left, top, right, bottom, BLACK)
        for k in range(5):
            y = y_min + (y_max - y_min) * k / 4
            if 0 < k < 4:
                canvas.line(left + 1, py(y), right - 1, py(y), GREY)
            canvas.text(4, int(py(y)) - 3, _fmt(y))
        for k in range(5):
            x = x_min + (x_max - x_min) * k / 4
            canvas.text(int(px(x)) - 6, bottom + 4, _fmt(x))
        canvas.text(left, top - 14, panel.title, scale=1)
        # 2. the reference line, dashed
        if panel.hline is not None:
            y = py(panel.hline)
            for x in range(left, right, 8):
                canvas.line(x, y, min(x + 4, right), y, (120, 120, 120))
        # 3. the vertical markers, dashed, each with its label beside its foot unless it would overlap the label
        #    drawn before it (dense markers keep their lines; their labels would be an unreadable smear)
        labels_end = -math.inf
        for m in sorted(panel.markers, key=lambda m: m.x if math.isfinite(m.x) else math.inf):
            if not math.isfinite(m.x):
                continue
            x = px(m.x)
            for y0 in range(top + 1, bottom, 8):
                canvas.line(x, y0, x, min(y0 + 4, bottom - 1), m.color)
            if m.label:
                label_w = len(m.label) * (GLYPH_W + 1)
                label_x = int(x) + 3 if x + 3 + label_w <= right else int(x) - 3 - label_w
                label_x = max(left + 1, label_x)
                if label_x > labels_end:
                    canvas.text(label_x, bottom - GLYPH_H - 3, m.label, m.color)
                    labels_end = label_x + label_w + 2
        # 4. the series, and a legend at the top right
        for k, s in enumerate(panel.series):
            color = s.color or PALETTE[k % len(PALETTE)]
            points = [(px(x), py(y)) for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y)]
            for (xa, ya), (xb, yb) in zip(points, points[1:]):
                canvas.line(xa, ya, xb, yb, color, width=2)
            if len(points) == 1:
                canvas.line(points[0][0], points[0][1], points[0][0], points[0][1], color, width=4)
            label_x = right - (len(s.label) + 3) * (GLYPH_W + 1) - 4
            canvas.line(label_x, top + 8 + 10 * k, label_x + 10, top + 8 + 10 * k, color, width=2)
            canvas.text(label_x + 14, top + 5 + 10 * k, s.label, color)
    canvas.text(width // 2 - len(x_label) * 3, height - 14, x_label)
    return canvas.png()
