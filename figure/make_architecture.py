#!/usr/bin/env python
"""Draw the PyConvSegNet architecture as an SVG (Python standard library only).

Usage::

    python figure/make_architecture.py                  # writes figure/pyconvsegnet_architecture.svg
    python figure/make_architecture.py --output x.svg   # writes elsewhere

The drawing follows the model in ``model/`` (see ``../shared/reference/BEHAVIOUR.md``):
a PyConvResNet backbone (``layer0`` stem, ``layer1..layer4``) with output stride 8, the
PyConvSegNet head (local PyConv block, global PyConv block, merge, classifier), bilinear x8
upsampling of the logits and the training-only auxiliary branch on ``layer3``. An inset explains a
pyramidal convolution. Spatial sizes are given for a 473 x 473 training crop.

The output is deterministic: the same script always writes the same bytes. Every text line is
checked against an estimate of its rendered width so that labels stay inside their boxes; the
script exits non-zero if one does not fit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "pyconvsegnet_architecture.svg"

WIDTH = 1200
HEIGHT = 930
FONT = "DejaVu Sans, Verdana, Arial, Helvetica, sans-serif"

# Colour scheme: (fill, stroke) per component kind.
COLOURS = {
    "io": ("#e5f3e8", "#3c8a55"),
    "backbone": ("#e2edf9", "#3b6ea5"),
    "head": ("#fde2c0", "#c0691a"),
    "aux": ("#eee6f7", "#7a5aa6"),
    "note": ("#ffffff", "#999999"),
}
PANELS = {
    "backbone": ("#f5f9fe", "#a8c3e2"),
    "head": ("#fffaf3", "#efc596"),
    "block": ("#fff1de", "#d9955a"),
    "aux": ("#fbf8fe", "#c4b1de"),
    "inset": ("#fbfbfb", "#bbbbbb"),
}
LEVEL_COLOURS = ["#4e79a7", "#59a14f", "#e8872b", "#d64b4f"]
ARROW = "#333333"
AUX_ARROW = "#7a5aa6"
DASH = "6,4"

LINE_H = 14.5  # line height of box text (px)


def fmt(v: float) -> str:
    """Stable number formatting (no float noise, no trailing zeros)."""
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def text_width(text: str, size: float, bold: bool = False) -> float:
    """Rough rendered width of ``text`` in DejaVu Sans (a wide font, so a safe upper estimate)."""
    narrow = set("il.,:;'|!()[]1 /·")
    wide = set("mwMW×→—%")
    w = 0.0
    for ch in text:
        if ch in narrow:
            w += 0.36
        elif ch in wide:
            w += 0.86
        elif ch.isupper() or ch.isdigit():
            w += 0.66
        else:
            w += 0.58
    return w * size * (1.07 if bold else 1.0)


class Svg:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.parts: List[str] = []
        self.problems: List[str] = []

    # ----------------------------------------------------------------- primitives
    def add(self, s: str) -> None:
        self.parts.append(s)

    def rect(self, x, y, w, h, fill, stroke, rx=6, dashed=False, stroke_width=1.4, extra="") -> None:
        dash = f' stroke-dasharray="{DASH}"' if dashed else ""
        self.add(f'<rect x="{fmt(x)}" y="{fmt(y)}" width="{fmt(w)}" height="{fmt(h)}" rx="{fmt(rx)}" '
                 f'fill="{fill}" stroke="{stroke}" stroke-width="{fmt(stroke_width)}"{dash}{extra}/>')

    def text(self, x, y, s, size=12.0, anchor="middle", bold=False, colour="#222222", italic=False,
             limit: Optional[Tuple[float, float]] = None) -> None:
        """One line of text; ``limit`` = (left, right) bounds it must fit between (checked)."""
        if limit is not None:
            w = text_width(s, size, bold)
            left = {"start": x, "middle": x - w / 2, "end": x - w}[anchor]
            if left < limit[0] - 0.5 or left + w > limit[1] + 0.5:
                self.problems.append(f"text {s!r} (~{w:.0f}px) does not fit in [{limit[0]:.0f}, {limit[1]:.0f}]")
        weight = ' font-weight="bold"' if bold else ""
        style = ' font-style="italic"' if italic else ""
        self.add(f'<text x="{fmt(x)}" y="{fmt(y)}" font-size="{fmt(size)}" text-anchor="{anchor}" '
                 f'fill="{colour}"{weight}{style}>{escape(s)}</text>')

    def line(self, points: Sequence[Tuple[float, float]], colour=ARROW, dashed=False, arrow=True,
             width=1.6) -> None:
        d = " ".join(f"{'M' if i == 0 else 'L'}{fmt(x)},{fmt(y)}" for i, (x, y) in enumerate(points))
        dash = f' stroke-dasharray="{DASH}"' if dashed else ""
        marker = ""
        if arrow:
            marker = ' marker-end="url(#arrow-aux)"' if colour == AUX_ARROW else ' marker-end="url(#arrow)"'
        self.add(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="{fmt(width)}"{dash}{marker}/>')

    # ----------------------------------------------------------------- composites
    def box(self, x, y, w, h, lines: Sequence[str], kind: str, title_lines: int = 1, size=11.5,
            footer: Optional[str] = None, dashed: bool = False) -> None:
        """A rounded box with centred text; the first ``title_lines`` lines are bold."""
        fill, stroke = COLOURS[kind]
        self.rect(x, y, w, h, fill, stroke, dashed=dashed)
        n = len(lines) + (1 if footer else 0)
        y0 = y + h / 2 - (n - 1) * LINE_H / 2 + size * 0.36
        for i, s in enumerate(lines):
            bold = i < title_lines
            self.text(x + w / 2, y0 + i * LINE_H, s, size=size + (0.5 if bold else 0), bold=bold,
                      limit=(x + 4, x + w - 4))
        if footer:
            self.text(x + w / 2, y0 + len(lines) * LINE_H, footer, size=size, bold=True, colour=stroke,
                      limit=(x + 4, x + w - 4))

    def panel(self, x, y, w, h, kind: str, label: str, dashed=False, label_size=13.0) -> None:
        fill, stroke = PANELS[kind]
        self.rect(x, y, w, h, fill, stroke, rx=10, dashed=dashed, stroke_width=1.2)
        self.text(x + 12, y + 19, label, size=label_size, anchor="start", bold=True, colour="#444444",
                  limit=(x + 6, x + w - 6))

    def render(self) -> str:
        head = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" font-family="{FONT}">\n'
            "<title>PyConvSegNet architecture</title>\n"
            "<desc>PyConvResNet backbone (layer0 stem, layer1..layer4, output stride 8), PyConvSegNet head "
            "(Local PyConv block, Global PyConv block, Merge, classifier), bilinear x8 upsampling and the "
            "training-only auxiliary branch on layer3; inset: a pyramidal convolution.</desc>\n"
            "<defs>\n"
            f'<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{ARROW}"/></marker>\n'
            f'<marker id="arrow-aux" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{AUX_ARROW}"/></marker>\n'
            "</defs>\n"
            f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#ffffff"/>\n'
        )
        return head + "\n".join(self.parts) + "\n</svg>\n"


# --------------------------------------------------------------------------- the figure
def draw() -> Svg:
    svg = Svg(WIDTH, HEIGHT)
    svg.text(WIDTH / 2, 30, "PyConvSegNet: PyConvResNet backbone (output stride 8) + PyConvSegNet head",
             size=19, bold=True, limit=(10, WIDTH - 10))
    svg.text(WIDTH / 2, 50, "shapes for a 473×473 training crop  ·  C = number of classes (150 on ADE20K)  ·  "
             "1/s = spatial size relative to the input", size=12, colour="#555555", limit=(10, WIDTH - 10))

    # ------------------------------------------------------------------ backbone row
    margin = 25
    bb_top, bb_box_y, bb_box_h = 64, 94, 108
    svg.panel(margin - 10, bb_top, WIDTH - 2 * (margin - 10), 172, "backbone",
              "Backbone: PyConvResNet-50/101/152 (ImageNet-pretrained), output stride 8")
    in_w, st_w, gap = 130, 170, 32
    stages = [
        (["layer0 (stem)", "7×7 conv 3→64, s2", "BN, ReLU", "(no max-pool)"], "64 ch · 1/2 (237²)"),
        (["layer1 · 3 blocks", "PyConv4, stride 2", "k 3/5/7/9", "g 1/4/8/16"], "256 ch · 1/4 (119²)"),
        (["layer2 · 4 blocks", "PyConv3, stride 2", "k 3/5/7", "g 1/4/8"], "512 ch · 1/8 (60²)"),
        (["layer3 · 6 blocks", "PyConv2, dilation 2", "k 3/5", "g 1/4"], "1024 ch · 1/8 (60²)"),
        (["layer4 · 3 blocks", "3×3 conv, dilation 4", "k 3", "g 1"], "2048 ch · 1/8 (60²)"),
    ]
    svg.box(margin, bb_box_y, in_w, bb_box_h, ["Input image", "3 × 473 × 473", "RGB, mean/std", "normalised"],
            "io", footer="1/1")
    xs = []
    x = margin + in_w + gap
    for lines, footer in stages:
        xs.append(x)
        svg.box(x, bb_box_y, st_w, bb_box_h, lines, "backbone", footer=footer)
        x += st_w + gap
    mid_y = bb_box_y + bb_box_h / 2
    prev_right = margin + in_w
    for x0 in xs:
        svg.line([(prev_right + 1, mid_y), (x0 - 2, mid_y)])
        prev_right = x0 + st_w
    svg.text(margin, bb_top + 162,
             "Bottleneck blocks (expansion 4); block counts for depth 50 (101: 3/4/23/3, 152: 3/8/36/3). "
             "Output stride 8: layer3/layer4 keep stride 1 and dilate.",
             size=10.5, anchor="start", colour="#555555", italic=True, limit=(margin, xs[3] + 40))
    layer3_x, layer4_x = xs[3], xs[4]
    bb_bottom = bb_box_y + bb_box_h

    # ------------------------------------------------------------------ head columns (flow right to left)
    ncol, col_w = 9, 106
    left, right = 30, WIDTH - 30
    col_gap = (right - left - ncol * col_w) / (ncol - 1)

    def col_x(i: int) -> float:
        return right - col_w - i * (col_w + col_gap)

    def col_cx(i: int) -> float:
        return col_x(i) + col_w / 2

    # ------------------------------------------------------------------ auxiliary row (dashed)
    aux_top, aux_box_y, aux_box_h = 254, 282, 62
    aux_cols = [2, 3, 4, 5]
    aux_left = col_x(aux_cols[-1]) - 14
    aux_right = col_x(aux_cols[0]) + col_w + 14
    svg.panel(aux_left, aux_top, aux_right - aux_left, 100, "aux",
              "Auxiliary branch (aux) · training loss only", dashed=True, label_size=12.5)
    aux_boxes = [
        ["3×3 conv", "1024→256", "BN, ReLU"],
        ["Dropout2d", "p = 0.1"],
        ["1×1 conv", "256→C"],
        ["aux loss", "0.4 × CE", "(training only)"],
    ]
    for c, lines in zip(aux_cols, aux_boxes):
        svg.box(col_x(c), aux_box_y, col_w, aux_box_h, lines, "aux", dashed=True)
    aux_mid = aux_box_y + aux_box_h / 2
    for a, b in zip(aux_cols, aux_cols[1:]):
        svg.line([(col_x(a) - 1, aux_mid), (col_x(b) + col_w + 2, aux_mid)], colour=AUX_ARROW, dashed=True)
    # layer3 -> aux: down from layer3, into the top of the aux conv.
    l3_cx = layer3_x + st_w / 2
    aux_in_x = min(max(l3_cx, col_x(aux_cols[0]) + 12), col_x(aux_cols[0]) + col_w - 12)
    svg.line([(aux_in_x, bb_bottom + 1), (aux_in_x, aux_box_y - 2)], colour=AUX_ARROW, dashed=True)
    svg.text(aux_in_x - 6, aux_box_y - 10, "1024 × 60²", size=10.5, anchor="end", colour=AUX_ARROW,
             limit=(aux_left + 320, aux_in_x))

    # ------------------------------------------------------------------ head
    head_top = 372
    local_top, local_h = 402, 112
    global_top, global_h = 524, 112
    box_h = 80
    svg.panel(15, head_top, WIDTH - 30, 280, "head",
              "PyConvSegNet head (pyconvhead) · every conv except the classifier's is followed by BN + ReLU")

    # Local PyConv block: columns 1..3; Global PyConv block: columns 0..4.
    lx0, lx1 = col_x(3) - 10, col_x(1) + col_w + 10
    gx0, gx1 = col_x(4) - 10, col_x(0) + col_w + 10
    svg.panel(lx0, local_top, lx1 - lx0, local_h, "block", "Local PyConv block", label_size=12.5)
    svg.panel(gx0, global_top, gx1 - gx0, global_h, "block", "Global PyConv block", label_size=12.5)
    local_box_y = local_top + 26
    global_box_y = global_top + 26
    pyconv_lines = ["PyConv4", "512→512", "k 3,5,7,9", "g 1,4,8,16"]
    local_boxes = {1: ["1×1 conv", "2048→512", "BN, ReLU"], 2: pyconv_lines + ["BN, ReLU"],
                   3: ["1×1 conv", "512→512", "BN, ReLU"]}
    global_boxes = {0: ["Adaptive", "AvgPool", "→ 9×9"], 1: ["1×1 conv", "2048→512", "BN, ReLU"],
                    2: pyconv_lines + ["BN, ReLU"], 3: ["1×1 conv", "512→512", "BN, ReLU"],
                    4: ["bilinear up", "9² → 60²", "align_corners"]}
    for c, lines in local_boxes.items():
        svg.box(col_x(c), local_box_y, col_w, box_h, lines, "head", title_lines=2 if c == 2 else 1)
    for c, lines in global_boxes.items():
        svg.box(col_x(c), global_box_y, col_w, box_h, lines, "head", title_lines=2 if c == 2 else 1)
    lmid, gmid = local_box_y + box_h / 2, global_box_y + box_h / 2
    for a in (1, 2):
        svg.line([(col_x(a) - 1, lmid), (col_x(a + 1) + col_w + 2, lmid)])
    for a in (0, 1, 2, 3):
        svg.line([(col_x(a) - 1, gmid), (col_x(a + 1) + col_w + 2, gmid)])

    # layer4 -> head: a trunk down column 0; a branch into the local block, the trunk into the pool.
    trunk_x = col_cx(0)
    l4_cx = layer4_x + st_w / 2
    svg.line([(l4_cx, bb_bottom + 1), (l4_cx, lmid), (col_x(1) + col_w + 2, lmid)])
    svg.line([(l4_cx, lmid), (l4_cx, global_box_y - 2)])
    svg.add(f'<circle cx="{fmt(l4_cx)}" cy="{fmt(lmid)}" r="3.2" fill="{ARROW}"/>')
    svg.text(l4_cx + 7, aux_box_y - 10, "2048 × 60²", size=10.5, anchor="start", colour="#333333",
             limit=(l4_cx, WIDTH - 15))
    svg.text(l4_cx + 7, aux_box_y + 4, "(1/8)", size=10.5, anchor="start", colour="#333333",
             limit=(l4_cx, WIDTH - 15))
    assert abs(l4_cx - trunk_x) < col_w / 2, "layer4 must sit above head column 0"

    # Merge spans both rows (column 5); then classifier, x8 upsampling and output.
    merge_y0, merge_y1 = local_box_y, global_box_y + box_h
    mx = col_x(5)
    svg.box(mx, merge_y0, col_w, merge_y1 - merge_y0,
            ["Merge", "concat", "512 + 512", "= 1024", "", "3×3 conv", "1024→256", "BN, ReLU"], "head")
    svg.line([(col_x(3) - 1, lmid), (mx + col_w + 2, lmid)])
    svg.line([(col_x(4) - 1, gmid), (mx + col_w + 2, gmid)])
    out_mid = (merge_y0 + merge_y1) / 2
    tail_h = 96
    tail_y = out_mid - tail_h / 2
    svg.box(col_x(6), tail_y, col_w, tail_h, ["Classifier", "(cls)", "Dropout2d 0.1", "1×1 conv", "256→C"],
            "head", title_lines=2, size=11)
    svg.box(col_x(7), tail_y, col_w, tail_h, ["Upsample ×8", "bilinear", "align_corners", "60² → 473²"],
            "head", size=11)
    svg.box(col_x(8), tail_y, col_w, tail_h, ["Output", "C × 473²", "logits (1/1)", "argmax →", "label map"],
            "io", size=11)
    svg.line([(mx - 1, out_mid), (col_x(6) + col_w + 2, out_mid)])
    svg.line([(col_x(6) - 1, out_mid), (col_x(7) + col_w + 2, out_mid)])
    svg.line([(col_x(7) - 1, out_mid), (col_x(8) + col_w + 2, out_mid)])
    svg.text(col_cx(6), tail_y + tail_h + 16, "C × 60²", size=10.5, colour="#555555",
             limit=(col_x(6), col_x(6) + col_w))
    svg.text(col_cx(8), tail_y + tail_h + 16, "main loss: CE", size=10.5, colour="#555555",
             limit=(col_x(8) - 10, col_x(8) + col_w + 10))
    svg.text(col_cx(8), tail_y + tail_h + 30, "(ignore 255)", size=10.5, colour="#555555",
             limit=(col_x(8) - 10, col_x(8) + col_w + 10))

    draw_inset(svg, 15, 668, 800, 250)
    draw_legend(svg, 830, 668, WIDTH - 15 - 830, 250)
    return svg


def draw_inset(svg: Svg, x: float, y: float, w: float, h: float) -> None:
    """A pyramidal convolution: parallel convs of growing kernel and groups on one input, concatenated."""
    svg.panel(x, y, w, h, "inset", "Inset: a pyramidal convolution (PyConv4 in layer1 and in the head)")
    levels = [(3, 1), (5, 4), (7, 8), (9, 16)]
    row_h, top = 44, y + 34
    cell = 3.6

    # input feature map: a small stack of sheets
    ix, iy, iw, ih = x + 22, top + 38, 92, 110
    for k in range(3, -1, -1):
        svg.rect(ix + k * 6, iy - k * 6, iw, ih, "#dfe9f5", "#3b6ea5", rx=2, stroke_width=1.0)
    svg.text(ix + iw / 2, iy + ih / 2 - 2, "input", size=12, bold=True, limit=(ix, ix + iw))
    svg.text(ix + iw / 2, iy + ih / 2 + 14, "C_in × H × W", size=11, limit=(ix, ix + iw))
    in_right, in_cy = ix + iw + 18, iy + ih / 2 - 9

    lvl_x = x + 190
    cx_right = x + w - 150
    for i, (k, g) in enumerate(levels):
        ry = top + i * row_h
        cy = ry + row_h / 2
        colour = LEVEL_COLOURS[i]
        # fan-out arrow
        svg.line([(in_right + 1, in_cy), (lvl_x - 10, cy)], colour="#666666", width=1.2)
        # kernel drawn as a k x k grid
        side = k * cell
        kx, ky = lvl_x + (9 * cell - side) / 2, cy - side / 2
        svg.rect(kx, ky, side, side, colour, colour, rx=0, stroke_width=0.6,
                 extra=' fill-opacity="0.25"')
        grid = []
        for j in range(1, k):
            grid.append(f"M{fmt(kx + j * cell)},{fmt(ky)} V{fmt(ky + side)}")
            grid.append(f"M{fmt(kx)},{fmt(ky + j * cell)} H{fmt(kx + side)}")
        svg.add(f'<path d="{" ".join(grid)}" stroke="{colour}" stroke-width="0.5" fill="none"/>')
        # text
        tx = lvl_x + 9 * cell + 14
        svg.text(tx, cy - 3, f"level {i + 1}: {k}×{k} conv, {g} group{'s' if g > 1 else ''}", size=12,
                 anchor="start", bold=True, colour=colour, limit=(tx, tx + 240))
        svg.text(tx, cy + 12, "→ C_out/4 channels; filter sees " + ("C_in" if g == 1 else f"C_in/{g}"), size=10.5,
                 anchor="start", colour="#444444", limit=(tx, tx + 240))
        # groups as a bar split into g slices
        bx, bw, bh = tx + 262, 96, 14
        svg.rect(bx, cy - bh / 2, bw, bh, "#ffffff", colour, rx=0, stroke_width=1.0)
        seps = " ".join(f"M{fmt(bx + j * bw / g)},{fmt(cy - bh / 2)} V{fmt(cy + bh / 2)}" for j in range(1, g))
        if seps:
            svg.add(f'<path d="{seps}" stroke="{colour}" stroke-width="0.8" fill="none"/>')
        svg.rect(bx, cy - bh / 2, bw / g, bh, colour, colour, rx=0, stroke_width=0.6, extra=' fill-opacity="0.45"')
        # fan-in arrow
        svg.line([(bx + bw + 6, cy), (cx_right - 2, top + 2 * row_h)], colour="#666666", width=1.2)
    svg.text(lvl_x + 262 + 9 * cell + 14 + 48, top - 4, "channel groups", size=10.5, colour="#555555",
             limit=(lvl_x + 262 + 9 * cell + 14, lvl_x + 262 + 9 * cell + 14 + 96))

    # concat box
    cw, ch = 130, 70
    svg.box(cx_right, top + 2 * row_h - ch / 2, cw, ch, ["concat", "C_out × H × W", "(then BN, ReLU)"], "head")
    svg.text(x + w / 2, y + h - 26,
             "Same input, stride and dilation for every level; bigger kernels use more groups, so the cost is no "
             "higher than one 3×3 conv.", size=10.5, colour="#555555", italic=True, limit=(x + 8, x + w - 8))
    svg.text(x + w / 2, y + h - 11,
             "PyConv3 (layer2): k 3/5/7, g 1/4/8, C_out/4, /4, /2 · PyConv2 (layer3): k 3/5, g 1/4, C_out/2 each "
             "· layer4: plain 3×3.", size=10.5, colour="#555555", italic=True, limit=(x + 8, x + w - 8))


def draw_legend(svg: Svg, x: float, y: float, w: float, h: float) -> None:
    svg.panel(x, y, w, h, "inset", "Legend")
    rows = [
        ("box", "io", False, "input image / output logits"),
        ("box", "backbone", False, "backbone stage (PyConvResNet)"),
        ("box", "head", False, "PyConvSegNet head layer"),
        ("panel", "block", False, "Local / Global PyConv block"),
        ("box", "aux", True, "auxiliary branch (training only)"),
        ("arrow", None, False, "feature flow"),
        ("arrow", None, True, "training-only path (loss weight 0.4)"),
    ]
    ry = y + 36
    for kind, key, dashed, label in rows:
        sx, sw, sh = x + 16, 40, 18
        if kind == "box":
            fill, stroke = COLOURS[key]
            svg.rect(sx, ry - sh / 2, sw, sh, fill, stroke, rx=4, dashed=dashed)
        elif kind == "panel":
            fill, stroke = PANELS[key]
            svg.rect(sx, ry - sh / 2, sw, sh, fill, stroke, rx=4, stroke_width=1.2)
        else:
            svg.line([(sx, ry), (sx + sw, ry)], colour=AUX_ARROW if dashed else ARROW, dashed=dashed)
        svg.text(sx + sw + 12, ry + 4, label, size=11.5, anchor="start", limit=(sx + sw + 8, x + w - 8))
        ry += 27
    svg.text(x + 16, ry + 2, "k = kernel sizes, g = groups per level", size=10.5, anchor="start",
             colour="#555555", limit=(x + 8, x + w - 8))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT,
                        help=f"SVG file to write (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    svg = draw()
    if svg.problems:
        for p in svg.problems:
            print(f"layout problem: {p}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        f.write(svg.render())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
