"""A reference set's quality report and contact sheet.

Identity methods are only as good as the faces they are given. Before a character can be
approved its references are analysed one by one (is there a face, only one, big enough, sharp
enough, how far turned) and as a set (do they all show the same person; which image does not).
The report is what an artist reads to fix a set; the contact sheet is what they look at.

Outliers are found by leave-one-out: each face is compared with the centroid of all *other*
faces, so one stranger cannot drag the centroid towards itself. A face is an outlier when that
similarity is below the backend's same-identity threshold, or far below the set's median
(median - max(0.15, 3 x MAD)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from imagegen.faces import FaceAnalyzer, FaceResult
from imagegen.faces.similarity import centroid, metric_for, similarities
from imagegen.identity.ingest import IngestedImage

#: a face box whose shorter side is below this many pixels is too small to embed reliably
MIN_FACE_PX = 64
#: variance of the Laplacian of the face crop (grey, 128 px) below which the face is blurry
MIN_SHARPNESS = 60.0
#: |yaw| above this (degrees, estimated from landmarks) is a profile rather than a portrait
MAX_YAW_DEG = 45.0
#: the leave-one-out similarity may sit this far below the median before it is an outlier
OUTLIER_MARGIN = 0.15
CROP_SIDE = 128

LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)


@dataclass
class ImageQuality:
    """What the analysis says about one reference image."""

    index: int
    filename: str
    width: int
    height: int
    face_found: bool
    face_count: int
    face_px: float | None = None
    sharpness: float | None = None
    yaw_deg: float | None = None
    similarity: float | None = None
    outlier: bool = False
    flags: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """A face that identity methods and the centroid should use."""
        return self.face_found and not self.outlier and "face_too_small" not in self.flags


@dataclass
class ReferenceReport:
    """Per image and per set: the numbers, the flags and a verdict."""

    backend: str
    model_version: str
    threshold: float
    images: list[ImageQuality]
    consistency: float | None
    verdict: str  # "pass" | "fail"
    reasons: list[str]
    warnings: list[str]

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def usable_indices(self) -> list[int]:
        return [q.index for q in self.images if q.usable]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for image, quality in zip(data["images"], self.images, strict=True):
            image["usable"] = quality.usable
        return data


def sharpness(image: np.ndarray, bbox) -> float:
    """Variance of the Laplacian of the face crop, resized to a fixed side so sizes compare."""
    x0, y0, x1, y1 = (int(round(v)) for v in bbox)
    h, w = image.shape[:2]
    crop = image[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if crop.size == 0:
        return 0.0
    grey = Image.fromarray(crop).convert("L").resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR)
    g = np.asarray(grey, dtype=np.float32)
    lap = (
        LAPLACIAN[0, 1] * g[:-2, 1:-1]
        + LAPLACIAN[1, 0] * g[1:-1, :-2]
        + LAPLACIAN[1, 1] * g[1:-1, 1:-1]
        + LAPLACIAN[1, 2] * g[1:-1, 2:]
        + LAPLACIAN[2, 1] * g[2:, 1:-1]
    )
    return float(lap.var())


def yaw_degrees(landmarks: np.ndarray) -> float:
    """A rough yaw from 5 landmarks: how far the nose sits off the eyes' midline.

    With the nose half an eye-distance to one side the head is turned about 90 degrees; in
    between we take the arcsine. Good enough to tell a portrait from a profile.
    """
    left, right, nose = landmarks[0], landmarks[1], landmarks[2]
    eye_distance = float(np.linalg.norm(right - left))
    if eye_distance <= 1e-6:
        return 90.0
    offset = (float(nose[0]) - float(left[0] + right[0]) / 2) / eye_distance
    return float(np.degrees(np.arcsin(np.clip(2 * offset, -1.0, 1.0))))


def leave_one_out_similarities(embeddings: list[np.ndarray], backend: str) -> np.ndarray:
    """Similarity of each embedding to the centroid of all the others."""
    if len(embeddings) < 2:
        return np.full(len(embeddings), np.nan, dtype=np.float32)
    out = []
    for i, embedding in enumerate(embeddings):
        others = embeddings[:i] + embeddings[i + 1 :]
        out.append(similarities(embedding, [centroid(others, backend)], backend)[0])
    return np.asarray(out, dtype=np.float32)


def mean_pairwise(embeddings: list[np.ndarray], backend: str) -> float | None:
    if len(embeddings) < 2:
        return None
    values = [similarities(embeddings[i], embeddings[i + 1 :], backend) for i in range(len(embeddings) - 1)]
    return float(np.concatenate(values).mean())


def analyze_set(images: list[IngestedImage], analyzer: FaceAnalyzer) -> tuple[list[FaceResult], ReferenceReport]:
    """Analyse every reference with ``analyzer`` and build the set's report."""
    results = [analyzer.largest(image.image) for image in images]
    return results, build_report(images, results, analyzer.name, analyzer.model_version)


def build_report(
    images: list[IngestedImage], results: list[FaceResult], backend: str, model_version: str
) -> ReferenceReport:
    metric = metric_for(backend)
    qualities: list[ImageQuality] = []
    for index, (image, result) in enumerate(zip(images, results, strict=True)):
        width, height = image.size
        quality = ImageQuality(index, image.filename, width, height, result.found, result.count)
        if not result.found:
            quality.flags.append("no_face")
        else:
            face = result.face
            quality.face_px = round(min(face.width, face.height), 1)
            quality.sharpness = round(sharpness(np.asarray(image.image), face.bbox), 1)
            quality.yaw_deg = round(yaw_degrees(face.landmarks), 1)
            if result.multiple:
                quality.flags.append("several_faces")
            if quality.face_px < MIN_FACE_PX:
                quality.flags.append("face_too_small")
            if quality.sharpness < MIN_SHARPNESS:
                quality.flags.append("blurry")
            if abs(quality.yaw_deg) > MAX_YAW_DEG:
                quality.flags.append("extreme_pose")
        qualities.append(quality)

    with_face = [q for q in qualities if q.face_found and "face_too_small" not in q.flags]
    embeddings = [results[q.index].face.embedding for q in with_face]
    loo = leave_one_out_similarities(embeddings, metric.backend)
    if len(with_face) >= 3:
        median = float(np.median(loo))
        mad = float(np.median(np.abs(loo - median)))
        floor = max(metric.threshold, median - max(OUTLIER_MARGIN, 3 * mad))
        for quality, value in zip(with_face, loo, strict=True):
            quality.similarity = round(float(value), 4)
            if value < floor:
                quality.outlier = True
                quality.flags.append("outlier")
    elif len(with_face) == 2:
        pair = float(similarities(embeddings[0], [embeddings[1]], metric.backend)[0])
        for quality in with_face:
            quality.similarity = round(pair, 4)

    inliers = [results[q.index].face.embedding for q in qualities if q.usable]
    consistency = mean_pairwise(inliers, metric.backend)
    reasons, warnings = [], []
    if not inliers:
        reasons.append("no usable face in the set: add clear, front-facing photos of the character")
    if any(q.outlier for q in qualities):
        names = ", ".join(q.filename for q in qualities if q.outlier)
        reasons.append(f"outliers (another person, or a very different look): {names}")
    if any("no_face" in q.flags for q in qualities):
        names = ", ".join(q.filename for q in qualities if "no_face" in q.flags)
        reasons.append(f"no face found in: {names}")
    if consistency is not None and consistency < metric.threshold:
        reasons.append(f"the set is inconsistent: mean similarity {consistency:.3f} < {metric.threshold}")
    for flag, text in (
        ("several_faces", "several faces (the largest was used)"),
        ("face_too_small", f"face smaller than {MIN_FACE_PX} px"),
        ("blurry", "blurry face"),
        ("extreme_pose", f"head turned more than {MAX_YAW_DEG:.0f} degrees"),
    ):
        names = [q.filename for q in qualities if flag in q.flags]
        if names:
            warnings.append(f"{text}: {', '.join(names)}")
    if 0 < len(inliers) < 3:
        warnings.append(f"only {len(inliers)} usable reference(s); 3 to 10 varied photos give a steadier identity")
    return ReferenceReport(
        backend=metric.backend,
        model_version=model_version,
        threshold=metric.threshold,
        images=qualities,
        consistency=None if consistency is None else round(consistency, 4),
        verdict="fail" if reasons else "pass",
        reasons=reasons,
        warnings=warnings,
    )


def set_centroid(results: list[FaceResult], report: ReferenceReport) -> np.ndarray | None:
    """The identity vector of the set: the centroid of its usable faces (None when there is none)."""
    usable = [results[i].face.embedding for i in report.usable_indices]
    return centroid(usable, report.backend) if usable else None


def contact_sheet(images: list[Image.Image], results: list[FaceResult], report: ReferenceReport) -> Image.Image:
    """Every reference with its face box, landmarks and scores: green usable, red flagged."""
    cell, caption, columns = 224, 58, min(5, max(1, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption) + 24), "white")
    draw = ImageDraw.Draw(sheet)
    consistency = "n/a" if report.consistency is None else f"{report.consistency:.3f}"
    draw.text(
        (6, 6),
        f"verdict: {report.verdict.upper()}   consistency: {consistency}   backend: {report.backend}",
        fill="darkgreen" if report.passed else "darkred",
    )
    for quality, image, result in zip(report.images, images, results, strict=True):
        x, y = (quality.index % columns) * cell, (quality.index // columns) * (cell + caption) + 24
        scale = min(cell / image.width, cell / image.height)
        thumb = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        sheet.paste(thumb, (x, y))
        colour = "lime" if quality.usable and not quality.flags else ("orange" if quality.usable else "red")
        if result.face is not None:
            x0, y0, x1, y1 = (v * scale for v in result.face.bbox)
            draw.rectangle([x + x0, y + y0, x + x1, y + y1], outline=colour, width=3)
            for px, py in result.face.landmarks * scale:
                draw.ellipse([x + px - 2, y + py - 2, x + px + 2, y + py + 2], fill=colour)
        else:
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline="red", width=3)

        def shown(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        lines = [
            f"{quality.index}: {quality.filename[:28]}",
            f"sim {shown(quality.similarity, '.2f')}  sharp {shown(quality.sharpness, '.0f')}"
            f"  yaw {shown(quality.yaw_deg, '.0f')}",
            ", ".join(quality.flags) or "ok",
        ]
        for i, line in enumerate(lines):
            draw.text((x + 4, y + cell + 2 + 15 * i), line, fill="darkred" if quality.flags and i == 2 else "black")
    return sheet
