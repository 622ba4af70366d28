"""Face detector recall: dlib HOG over a sweep of ``min_score`` and upsampling, on real photos.

    .venv/bin/python bench/face_recall.py                 # HOG sweep: tune, then the held-back half
    .venv/bin/python bench/face_recall.py --cnn           # also dlib's MMOD CNN (minutes on CPU)
    .venv/bin/python bench/face_recall.py --json out.json

Photos (all ship inside wheels the project already installs; nothing is downloaded or copied
into this repository, the script reads them from the installed packages at run time):

- ``skimage.data.astronaut()`` (NASA, public domain) and matplotlib's ``grace_hopper.jpg`` (US
  Navy, public domain): the two photos the old ``min_score=0.3`` was chosen on.
- insightface's ``data/images/t1.jpg``: a 1280x886 group photo, six people (a TV promotional
  still, *not* public domain: used here for measurement only) and ``Tom_Hanks_54745.png``, a
  112x112 aligned face crop.
- ``skimage.data.lfw_subset()``: 100 face crops of 25x25 px from Labeled Faces in the Wild (news
  photos, each a different photo; measurement only). Each is enlarged to a face of 48-128 px
  (bicubic) and framed on a grey border of half its size, one augmentation each.
- Non-face photos: scikit-image's other sample images (coffee, the cat ``chelsea``, rocket,
  coins, text, textures, microscopy...), pywt's ``ascent`` (people on stairs seen from behind,
  no face visible) and ``aero``, matplotlib's two PNG samples, insightface's four face-mask
  photos (a mask with no face: a hard negative). The cameraman (``skimage.data.camera``) is
  a profile: not labelled as a face, and a detection on his head is ignored (neither counted
  as found nor as a false positive).

Labelling (by hand, by the author of this script): a face is counted when both eyes are visible
(frontal to three-quarter view, eyes open or closed), whatever its size. The boxes were drawn
on the photos by eye, starting from detector proposals, and checked on overlays; profile faces,
the backs of heads and the small painted portrait on the wall of ``t1.jpg`` are *ignore*
regions. For LFW the face box is the enlarged crop itself. A detection is a hit when its centre
lies inside an unmatched labelled box and its width is 0.5-2x the box's; a detection that is
neither a hit nor inside an ignore region is a false positive (a second detection on the same
face included).

Augmentations per photo (boxes transformed alongside): original, mirror, rotations by +-4, +-6
and +-8 degrees about the first labelled face, darker (brightness 0.6, contrast 0.8), brighter
(1.35, 1.1), JPEG at quality 20, downscale to half size. Non-face photos get original, mirror,
+-6 degrees about the centre and half size.

Split by source photo, never by augmentation: the tuning half holds the astronaut, Grace
Hopper, the even-numbered LFW faces and every other non-face photo; the held-back half holds
the group photo, the Tom Hanks crop, the odd-numbered LFW faces and the other non-face photos.

Each image is run once per upsampling level (0, 1, 2) with a very low threshold and every
detection's score kept; a ``min_score`` then keeps the detections scoring at least that much,
which is exactly what the detector returns when run with that threshold (its non-maximum
suppression is greedy from the highest score). Upsampling policies: a fixed count, or ``auto``
(the backend's rule: once when the longest side is <= 1024 px, else none).

Choices, all made on the tuning half and then reported on the held-back half:

1. A plain HOG cut, per upsampling policy: the ``min_score`` that minimises errors (missed faces
   + false positives, equal cost: a missed face is a false QA failure; a false positive can
   become the "main" face, flags a reference as "several faces" or sends a non-face to the age
   gate), the middle of the widest interval of scores reaching the minimum (the largest margin
   both ways); between policies the fewest errors, then the cheapest. The old setting
   (``auto``, 0.3) and face_recognition's (upsample once, no cut: 0.0) are shown beside it.
2. What the backend does now: HOG (``auto``) kept from ``min_score``; detections below
   ``verify_below`` kept only when dlib's MMOD CNN, run on a crop around the box
   (``DlibAnalyzer.verify_confidence``), finds a face there with confidence >= 0.3. Over a grid
   of both: the fewest tuning errors, then the fewest CNN checks (the cost), then the higher cut.
   (The crop's geometry, ``VERIFY_MARGIN`` / ``VERIFY_BOX_PX``, was set afterwards for speed on
   the weak detections of both halves: margins of 0.1-0.5 decided alike but for one face.)
3. The backend's defaults end to end (``DlibAnalyzer().detect``): the figures must agree with 2.
4. ``--cnn``: the MMOD CNN on whole images (``detector="cnn"``), for comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Box = tuple[float, float, float, float]

#: every detection down to this score is recorded; the sweep filters above it
FLOOR = -1.0
#: thresholds evaluated for the choice (fine) and printed (coarse)
FINE = [round(x, 2) for x in np.arange(-0.6, 1.5001, 0.01)]
COARSE = [-0.2, -0.1, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]
POLICIES = ("0", "1", "2", "auto")
AUTO_MAX_SIDE = 1024  # imagegen.faces.dlib_backend.AUTO_UPSAMPLE_MAX_SIDE
OLD = ("auto", 0.3)
FACE_RECOGNITION = ("1", 0.0)
#: HOG + MMOD check grid: HOG cut (min_score) x score below which the MMOD CNN must confirm
CASCADE_FLOORS = (-0.6, -0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2)
VERIFY_GRID = (0.3, 0.5, 0.8, 1.0, 1.2)
SPLITS = {"tune": "tuning half", "held": "held-back half"}


# --------------------------------------------------------------------------- photos and labels


@dataclass
class Photo:
    name: str
    split: str  # "tune" or "held"
    load: Callable[[], Image.Image]
    faces: list[Box] = field(default_factory=list)
    ignore: list[Box] = field(default_factory=list)
    augmentations: tuple[str, ...] = ()


@dataclass
class Instance:
    photo: str
    split: str
    augmentation: str
    image: np.ndarray
    faces: list[Box]
    ignore: list[Box]


FACE_AUGS = (
    "original",
    "mirror",
    "rot+4",
    "rot-4",
    "rot+6",
    "rot-6",
    "rot+8",
    "rot-8",
    "dark",
    "bright",
    "jpeg20",
    "half",
)
NONFACE_AUGS = ("original", "mirror", "rot+6", "rot-6", "half")
LFW_AUGS = ("original", "mirror", "rot+6", "dark", "jpeg20", "rot-6", "bright")
LFW_SIZES = (48, 64, 80, 96, 128)

# hand labels (x0, y0, x1, y1) in the original photos
ASTRONAUT_FACE: Box = (170, 72, 268, 172)
HOPPER_FACE: Box = (162, 137, 378, 355)
T1_FACES: list[Box] = [
    (64, 280, 178, 394),  # left, red-blonde hair, eyes down
    (272, 174, 366, 268),  # dark hair, head tilted, looking down
    (448, 292, 560, 404),  # centre left, smiling
    (722, 364, 835, 478),  # centre right, laughing
    (868, 64, 1002, 200),  # standing man, three-quarter view
    (1114, 280, 1230, 394),  # right, blonde, eyes closed
]
T1_IGNORE: list[Box] = [(296, 52, 364, 108)]  # painted portrait on the wall, ~15 px face
HANKS_FACE: Box = (8, 24, 102, 116)
CAMERA_IGNORE: list[Box] = [(190, 95, 295, 205)]  # the cameraman's head, in profile


def _site(package: str, *parts: str) -> Path:
    module = __import__(package)
    return Path(os.path.dirname(module.__file__), *parts)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            canvas = Image.new("RGB", im.size, (255, 255, 255))
            canvas.paste(im, mask=im.split()[-1])
            return canvas
        return im.convert("RGB")


def _skimage(name: str) -> Callable[[], Image.Image]:
    return lambda: _open(_site("skimage", "data", f"{name}"))


def _npz(package: str, name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with np.load(_site(package, "data", name)) as z:
            array = z[z.files[0]]
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")

    return load


def _mpl(name: str) -> Callable[[], Image.Image]:
    return lambda: _open(_site("matplotlib", "mpl-data", "sample_data", name))


def _insightface(name: str) -> Callable[[], Image.Image]:
    return lambda: _open(_site("insightface", "data", "images", name))


NONFACE_SOURCES: list[tuple[str, Callable[[], Image.Image]]] = [
    ("coffee", _skimage("coffee.png")),
    ("chelsea (cat)", _skimage("chelsea.png")),
    ("rocket", _skimage("rocket.jpg")),
    ("horse", _skimage("horse.png")),
    ("coins", _skimage("coins.png")),
    ("clock", _skimage("clock_motion.png")),
    ("text", _skimage("text.png")),
    ("page", _skimage("page.png")),
    ("brick", _skimage("brick.png")),
    ("grass", _skimage("grass.png")),
    ("gravel", _skimage("gravel.png")),
    ("moon", _skimage("moon.png")),
    ("retina", _skimage("retina.jpg")),
    ("ihc", _skimage("ihc.png")),
    ("cell", _skimage("cell.png")),
    ("color", _skimage("color.png")),
    ("hubble", _skimage("hubble_deep_field.jpg")),
    ("motorcycle", _skimage("motorcycle_left.png")),
    ("skimage logo", _skimage("logo.png")),
    ("ascent (backs of heads)", _npz("pywt", "ascent.npz")),
    ("aero", _npz("pywt", "aero.npz")),
    ("mpl Minduka", _mpl("Minduka_Present_Blue_Pack.png")),
    ("mpl logo2", _mpl("logo2.png")),
    ("mask black", _insightface("mask_black.jpg")),
    ("mask blue", _insightface("mask_blue.jpg")),
    ("mask green", _insightface("mask_green.jpg")),
    ("mask white", _insightface("mask_white.jpg")),
    ("camera (profile, ignored)", _skimage("camera.png")),
]


def photos() -> list[Photo]:
    from imagegen import samples

    out = [
        Photo("astronaut", "tune", samples.astronaut, [ASTRONAUT_FACE], [], FACE_AUGS),
        Photo("grace_hopper", "tune", samples.grace_hopper, [HOPPER_FACE], [], FACE_AUGS),
        Photo("t1 group photo", "held", _insightface("t1.jpg"), T1_FACES, T1_IGNORE, FACE_AUGS),
        Photo("tom_hanks crop", "held", _insightface("Tom_Hanks_54745.png"), [HANKS_FACE], [], FACE_AUGS),
    ]
    for i, (name, load) in enumerate(NONFACE_SOURCES):
        ignore = CAMERA_IGNORE if name.startswith("camera") else []
        out.append(Photo(name, "tune" if i % 2 == 0 else "held", load, [], ignore, NONFACE_AUGS))
    return out


def lfw_instances() -> list[Instance]:
    """The 100 LFW faces, each enlarged, framed on grey and augmented once (deterministic)."""
    with open(_site("skimage", "data", "lfw_subset.npy"), "rb") as f:
        crops = np.load(f)[:100]  # the first 100 are faces, the rest non-face patches
    out = []
    for i, crop in enumerate(crops):
        size = LFW_SIZES[i % len(LFW_SIZES)]
        pad = size // 2
        face = Image.fromarray((crop * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size + 2 * pad, size + 2 * pad), (128, 128, 128))
        canvas.paste(face.convert("RGB"), (pad, pad))
        aug = LFW_AUGS[(i // len(LFW_SIZES)) % len(LFW_AUGS)]
        image, faces, _ = augment(canvas, aug, [(pad, pad, pad + size, pad + size)], [])
        out.append(Instance(f"lfw{i:03d}", "tune" if i % 2 == 0 else "held", aug, np.asarray(image), faces, []))
    return out


# --------------------------------------------------------------------------- augmentations


def _rotate_box(box: Box, degrees: float, centre: tuple[float, float]) -> Box:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    a = math.radians(degrees)  # PIL rotates counter-clockwise on screen (y down)
    dx, dy = cx - centre[0], cy - centre[1]
    nx = centre[0] + dx * math.cos(a) + dy * math.sin(a)
    ny = centre[1] - dx * math.sin(a) + dy * math.cos(a)
    w, h = box[2] - box[0], box[3] - box[1]
    return (nx - w / 2, ny - h / 2, nx + w / 2, ny + h / 2)


def augment(image: Image.Image, kind: str, faces: list[Box], ignore: list[Box]):
    """``(image, faces, ignore)`` after augmentation ``kind`` (boxes moved with the pixels)."""
    w, h = image.size
    boxes = [faces, ignore]
    if kind == "original":
        return image, faces, ignore
    if kind == "mirror":
        out = ImageOps.mirror(image)
        boxes = [[(w - b[2], b[1], w - b[0], b[3]) for b in group] for group in boxes]
        return out, *boxes
    if kind.startswith("rot"):
        degrees = float(kind[3:])
        fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
        # about the first labelled face (it stays in frame, as in imagegen.samples.augment), else the centre
        centre = ((faces[0][0] + faces[0][2]) / 2, (faces[0][1] + faces[0][3]) / 2) if faces else (w / 2, h / 2)
        out = image.rotate(degrees, resample=Image.Resampling.BICUBIC, center=centre, fillcolor=fill)
        boxes = [[_rotate_box(b, degrees, centre) for b in group] for group in boxes]
        return out, *boxes
    if kind == "dark":
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(0.6)).enhance(0.8)
        return out, faces, ignore
    if kind == "bright":
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.35)).enhance(1.1)
        return out, faces, ignore
    if kind == "jpeg20":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=20)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB"), faces, ignore
    if kind == "half":
        out = image.resize((max(1, round(w / 2)), max(1, round(h / 2))), Image.Resampling.LANCZOS)
        sx, sy = out.width / w, out.height / h
        boxes = [[(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in group] for group in boxes]
        return out, *boxes
    raise ValueError(kind)


def instances() -> list[Instance]:
    out = []
    for photo in photos():
        base = photo.load()
        for aug in photo.augmentations:
            image, faces, ignore = augment(base, aug, photo.faces, photo.ignore)
            out.append(Instance(photo.name, photo.split, aug, np.asarray(image), faces, ignore))
    return out + lfw_instances()


# --------------------------------------------------------------------------- detection and scoring

Detection = tuple[Box, float]


def run_hog(items: list[Instance]) -> tuple[dict[str, list[list[Detection]]], dict[str, list[float]]]:
    """Every HOG detection scoring >= FLOOR, per upsampling level, per instance; seconds per image."""
    import dlib

    hog = dlib.get_frontal_face_detector()
    dets: dict[str, list[list[Detection]]] = {}
    seconds: dict[str, list[float]] = {}
    for up in (0, 1, 2):
        level, times = [], []
        for item in items:
            start = time.perf_counter()
            rects, scores, _ = hog.run(item.image, up, FLOOR)
            times.append(time.perf_counter() - start)
            level.append([(_box(r), float(s)) for r, s in zip(rects, scores, strict=True)])
        dets[str(up)], seconds[str(up)] = level, times
        print(f"  HOG upsample {up}: {sum(times):.1f} s for {len(items)} images", file=sys.stderr)
    return dets, seconds


def _box(rect) -> Box:
    return (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)


def run_cnn(items: list[Instance], upsample: int) -> tuple[list[list[Detection]], float]:
    import dlib

    from imagegen.faces.dlib_backend import _model_paths

    cnn = dlib.cnn_face_detection_model_v1(str(_model_paths()["cnn"]))
    out, start = [], time.perf_counter()
    for item in items:
        found = cnn(item.image, upsample)
        out.append([(_box(d.rect), float(d.confidence)) for d in found])
    seconds = time.perf_counter() - start
    print(f"  CNN upsample {upsample}: {seconds:.1f} s for {len(items)} images", file=sys.stderr)
    return out, seconds


def auto_level(item: Instance) -> str:
    return "1" if max(item.image.shape[:2]) <= AUTO_MAX_SIDE else "0"


def for_policy(per_level: dict[str, list], items: list[Instance], policy: str) -> list:
    """Per image, the entry of the upsampling level that ``policy`` runs it at."""
    if policy == "auto":
        return [per_level[auto_level(item)][i] for i, item in enumerate(items)]
    return per_level[policy]


def _inside(x: float, y: float, box: Box) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def match(item: Instance, found: Iterable[Detection]) -> dict[str, object]:
    """Hits, misses and false positives of one image's detections (largest-first like the backend)."""
    taken = [False] * len(item.faces)
    hits = fps = 0
    largest: tuple[float, str] | None = None
    for box, _score in sorted(found, key=lambda d: -d[1]):
        cx, cy, width = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0]
        kind = "fp"
        for j, face in enumerate(item.faces):
            fw = face[2] - face[0]
            if not taken[j] and _inside(cx, cy, face) and 0.5 * fw <= width <= 2 * fw:
                taken[j], kind = True, "hit"
                break
        else:
            if any(_inside(cx, cy, ig) for ig in item.ignore):
                kind = "ignored"
        hits += kind == "hit"
        fps += kind == "fp"
        area = width * (box[3] - box[1])
        if kind != "ignored" and (largest is None or area > largest[0]):
            largest = (area, kind)
    return {
        "hits": hits,
        "fps": fps,
        "faces": len(item.faces),
        "main_wrong": bool(item.faces) and largest is not None and largest[1] == "fp",
    }


def score_ranges(items: list[Instance], dets: list[list[Detection]]) -> dict[str, dict[str, float | None]]:
    """Per half: the lowest score of a true face found and the highest of a false positive."""
    out = {}
    for split in SPLITS:
        hits, fps = [], []
        for item, found in zip(items, dets, strict=True):
            if item.split != split:
                continue
            for det in found:
                m = match(item, [det])
                (hits if m["hits"] else fps if m["fps"] else []).append(det[1])
        out[split] = {
            "lowest_face": round(min(hits), 3) if hits else None,
            "highest_false_positive": round(max(fps), 3) if fps else None,
        }
    return out


def evaluate(items: list[Instance], dets: list[list[Detection]], threshold: float, split: str) -> dict[str, object]:
    faces = hits = fps = fp_nonface_images = fp_face_images = missed_images = wrong_main = 0
    face_images = nonface_images = 0
    for item, found in zip(items, dets, strict=True):
        if item.split != split:
            continue
        m = match(item, [d for d in found if d[1] >= threshold])
        faces += m["faces"]
        hits += m["hits"]
        fps += m["fps"]
        if item.faces:
            face_images += 1
            fp_face_images += m["fps"] > 0
            missed_images += m["hits"] == 0
            wrong_main += m["main_wrong"]
        else:
            nonface_images += 1
            fp_nonface_images += m["fps"] > 0
    return {
        "faces": faces,
        "found": hits,
        "recall": round(hits / faces, 4) if faces else None,
        "false_positives": fps,
        "errors": faces - hits + fps,
        "face_images": face_images,
        "face_images_with_no_face_found": missed_images,
        "face_images_with_a_false_positive": fp_face_images,
        "face_images_whose_largest_detection_is_false": wrong_main,
        "nonface_images": nonface_images,
        "nonface_images_with_a_detection": fp_nonface_images,
    }


def choose(
    items: list[Instance], dets: list[list[Detection]], grid: list[float]
) -> tuple[float, int, tuple[float, float]]:
    """The middle of the widest run of ``grid`` thresholds with the fewest tuning errors."""
    errors = [evaluate(items, dets, t, "tune")["errors"] for t in grid]
    best = min(errors)
    runs, start = [], None
    for i, e in enumerate(errors + [None]):
        if e == best and start is None:
            start = i
        elif e != best and start is not None:
            runs.append((start, i - 1))
            start = None
    lo, hi = max(runs, key=lambda r: (grid[r[1]] - grid[r[0]], -r[0]))
    middle = (grid[lo] + grid[hi]) / 2
    # a round number inside the run when there is one (0.05 steps), else the exact middle
    rounded = round(middle * 20) / 20
    chosen = rounded if grid[lo] <= rounded <= grid[hi] else round(middle, 2)
    return chosen, best, (grid[lo], grid[hi])


# --------------------------------------------------------------------------- HOG + MMOD check


def run_verify(items: list[Instance], dets: list[list[Detection]], analyzer) -> tuple[list[list[float]], list[float]]:
    """The backend's MMOD confidence for every detection the cascade grid may ask about; seconds per call."""
    lo, hi = min(CASCADE_FLOORS), max(VERIFY_GRID)
    confidences, seconds = [], []
    for item, found in zip(items, dets, strict=True):
        row = []
        for box, score in found:
            if lo <= score < hi:
                start = time.perf_counter()
                row.append(analyzer.verify_confidence(item.image, box))
                seconds.append(time.perf_counter() - start)
            else:
                row.append(math.nan)  # never asked: below every floor or above every verify_below
        confidences.append(row)
    print(f"  MMOD checks: {len(seconds)} in {sum(seconds):.1f} s", file=sys.stderr)
    return confidences, seconds


def cascade(
    dets: list[list[Detection]], confidences: list[list[float]], floor: float, verify_below: float, need: float
) -> tuple[list[list[Detection]], int]:
    """Detections the backend keeps at (floor, verify_below), and how many MMOD checks that costs."""
    kept, checks = [], 0
    for found, conf in zip(dets, confidences, strict=True):
        row = []
        for (box, score), c in zip(found, conf, strict=True):
            if score < floor:
                continue
            if score < verify_below:
                checks += 1
                if not c >= need:
                    continue
            row.append((box, score))
        kept.append(row)
    return kept, checks


def choose_cascade(items, dets, confidences, need: float) -> tuple[float, float, int]:
    """(floor, verify_below) with the fewest tuning errors, then the fewest MMOD checks on the tuning half."""
    tune = [i for i, item in enumerate(items) if item.split == "tune"]
    best = None
    for floor in CASCADE_FLOORS:
        for verify_below in VERIFY_GRID:
            kept, _ = cascade(dets, confidences, floor, verify_below, need)
            errors = evaluate(items, kept, -math.inf, "tune")["errors"]
            _, checks = cascade([dets[i] for i in tune], [confidences[i] for i in tune], floor, verify_below, need)
            key = (errors, checks, -floor)
            if best is None or key < best[0]:
                best = (key, floor, verify_below)
    return best[1], best[2], best[0][0]


# --------------------------------------------------------------------------- report


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cell(m: dict[str, object]) -> str:
    return f"{m['found']}/{m['faces']} · {m['false_positives']} FP"


def summary_row(name: str, split: str, m: dict[str, object], ms: float | None) -> list[str]:
    return [
        name,
        split,
        f"{m['found']}/{m['faces']}",
        f"{100 * m['recall']:.1f}%",
        f"{m['face_images_with_no_face_found']}/{m['face_images']}",
        str(m["false_positives"]),
        f"{m['nonface_images_with_a_detection']}/{m['nonface_images']}",
        str(m["face_images_whose_largest_detection_is_false"]),
        "" if ms is None else f"{ms:.0f}",
    ]


SUMMARY_HEADER = [
    "setting",
    "half",
    "faces found",
    "recall",
    "face images, none found",
    "false pos.",
    "non-face images hit",
    "largest is false",
    "ms/image",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn", action="store_true", help="also run dlib's MMOD CNN on whole images (slow on CPU)")
    parser.add_argument("--cnn-upsample", type=int, default=0, help="upsampling for the --cnn run (default 0)")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    import dlib

    from imagegen.faces.dlib_backend import VERIFY_MIN_CONFIDENCE, DlibAnalyzer

    print("building the image set...", file=sys.stderr)
    items = instances()
    counts = {
        split: {
            "images": sum(i.split == split for i in items),
            "face_images": sum(i.split == split and bool(i.faces) for i in items),
            "faces": sum(len(i.faces) for i in items if i.split == split),
            "source_photos": len({i.photo for i in items if i.split == split}),
        }
        for split in ("tune", "held")
    }
    print(f"  {json.dumps(counts)}", file=sys.stderr)
    hog, seconds = run_hog(items)
    ms_per_image = {p: 1000 * float(np.mean(for_policy(seconds, items, p))) for p in POLICIES}

    # 1. a plain HOG score cut, per upsampling policy
    sweep: dict[str, dict[str, dict[str, object]]] = {}
    choices: dict[str, dict[str, object]] = {}
    for policy in POLICIES:
        dets = for_policy(hog, items, policy)
        sweep[policy] = {f"{t:+.2f}": {s: evaluate(items, dets, t, s) for s in SPLITS} for t in COARSE}
        t, best, interval = choose(items, dets, FINE)
        choices[policy] = {"min_score": t, "tuning_errors": best, "interval": interval}
    cost_rank = {"0": 0, "auto": 1, "1": 2, "2": 3}
    policy = min(POLICIES, key=lambda p: (choices[p]["tuning_errors"], cost_rank[p]))
    plain = (policy, choices[policy]["min_score"])

    def at(setting: tuple[str, float], split: str) -> dict[str, object]:
        return evaluate(items, for_policy(hog, items, setting[0]), setting[1], split)

    settings = {
        "old: auto, 0.3": OLD,
        "face_recognition: 1, 0.0": FACE_RECOGNITION,
        f"best plain cut: {plain[0]}, {plain[1]}": plain,
    }

    # 2. HOG + MMOD check of the weak detections (auto upsampling), as the backend runs it
    analyzer = DlibAnalyzer()
    auto = for_policy(hog, items, "auto")
    confidences, verify_seconds = run_verify(items, auto, analyzer)
    ms_per_check = 1000 * float(np.mean(verify_seconds)) if verify_seconds else 0.0
    floor, verify_below, cascade_errors = choose_cascade(items, auto, confidences, VERIFY_MIN_CONFIDENCE)
    cascade_sweep = {}
    for f in CASCADE_FLOORS:
        for v in VERIFY_GRID:
            kept, checks = cascade(auto, confidences, f, v, VERIFY_MIN_CONFIDENCE)
            cascade_sweep[f"{f:+.2f}<{v:.2f}"] = {
                "checks_per_image": round(checks / len(items), 3),
                **{s: evaluate(items, kept, -math.inf, s) for s in SPLITS},
            }

    # 3. the backend as configured now, end to end (is the code default what was chosen?)
    backend_dets, backend_seconds = [], []
    for item in items:
        start = time.perf_counter()
        backend_dets.append([(f.bbox, f.det_score) for f in analyzer.detect(item.image)])
        backend_seconds.append(time.perf_counter() - start)
    backend = {s: evaluate(items, backend_dets, -math.inf, s) for s in SPLITS}
    backend_ms = 1000 * float(np.mean(backend_seconds))

    report: dict[str, object] = {
        "benchmark": "face_recall",
        "machine": {"python": platform.python_version(), "dlib": dlib.__version__, "cpus": os.cpu_count()},
        "counts": counts,
        "hog_ms_per_image": {p: round(v, 1) for p, v in ms_per_image.items()},
        "hog_auto_score_ranges": score_ranges(items, for_policy(hog, items, "auto")),
        "plain_cut": {
            "sweep": sweep,
            "choice_per_policy": choices,
            "chosen": {"upsample": plain[0], "min_score": plain[1]},
            "settings": {name: {s: at(value, s) for s in SPLITS} for name, value in settings.items()},
        },
        "hog_plus_mmod_check": {
            "verify_min_confidence": VERIFY_MIN_CONFIDENCE,
            "ms_per_check": round(ms_per_check, 1),
            "sweep": cascade_sweep,
            "chosen": {"min_score": floor, "verify_below": verify_below, "tuning_errors": cascade_errors},
        },
        "backend_default": {
            "describe": {k: v for k, v in analyzer.describe().items() if k != "model_version"},
            "ms_per_image": round(backend_ms, 1),
            **backend,
        },
    }
    if args.cnn:
        cnn, cnn_seconds = run_cnn(items, args.cnn_upsample)
        t, best, interval = choose(items, cnn, [t for t in FINE if t >= 0])
        report["cnn"] = {
            "upsample": args.cnn_upsample,
            "ms_per_image": round(1000 * cnn_seconds / len(items), 1),
            "sweep": {f"{c:+.2f}": {s: evaluate(items, cnn, c, s) for s in SPLITS} for c in (0.0, 0.3, 0.5)},
            "chosen": {"min_score": t, "tuning_errors": best, "interval": interval},
            "at_chosen": {s: evaluate(items, cnn, t, s) for s in SPLITS},
        }

    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    print()
    header = ["upsample", "ms/image"] + [f"{t:+.2f}" for t in COARSE]
    for split in SPLITS:
        print(f"Plain HOG cut, {SPLITS[split]}: faces found / labelled · false positives, per min_score")
        rows = [[p, f"{ms_per_image[p]:.0f}"] + [cell(sweep[p][f"{t:+.2f}"][split]) for t in COARSE] for p in POLICIES]
        print(table(rows, header) + "\n")
    print("HOG (auto upsampling) + MMOD check below verify_below: faces found · false positives, checks/image")
    rows = []
    for key, entry in cascade_sweep.items():
        f, v = key.split("<")
        rows.append([f, v, cell(entry["tune"]), cell(entry["held"]), f"{entry['checks_per_image']:.2f}"])
    print(table(rows, ["min_score", "verify_below", SPLITS["tune"], SPLITS["held"], "MMOD checks/image"]) + "\n")
    rows = []
    for name, value in settings.items():
        for split in SPLITS:
            rows.append(summary_row(name, split, report["plain_cut"]["settings"][name][split], ms_per_image[value[0]]))
    described = analyzer.describe()
    name = f"backend default: {described['min_score']}, MMOD check < {described['verify_below']}"
    for split in SPLITS:
        rows.append(summary_row(name, split, backend[split], backend_ms))
    if args.cnn:
        name = f"dlib-cnn: upsample {args.cnn_upsample}, {report['cnn']['chosen']['min_score']}"
        for split in SPLITS:
            rows.append(summary_row(name, split, report["cnn"]["at_chosen"][split], report["cnn"]["ms_per_image"]))
    print(table(rows, SUMMARY_HEADER))
    print(f"\nplain cut chosen per policy (tuning half): {json.dumps(choices)}")
    print(f"HOG + MMOD chosen on the tuning half: min_score {floor}, verify_below {verify_below}")
    print(f"DlibAnalyzer() now: min_score {described['min_score']}, verify_below {described['verify_below']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
