"""The reference report on real faces: clean sets pass, strangers and empty frames are flagged."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from imagegen import samples
from imagegen.identity.ingest import ingest_image
from imagegen.identity.references import analyze_set, contact_sheet, set_centroid, yaw_degrees
from tests.photos import astronaut_set, encode, hopper_set, no_face


def ingest(files):
    return [ingest_image(data, name) for name, data in files]


def test_same_person_set_passes(dlib):
    images = ingest(astronaut_set(6))
    results, report = analyze_set(images, dlib)
    assert report.passed, report.reasons
    assert all(q.face_found and not q.outlier for q in report.images)
    assert report.consistency > report.threshold
    assert len(report.usable_indices) == 6
    assert set_centroid(results, report).shape == (128,)


def test_two_strangers_in_ten_are_exactly_the_outliers(dlib):
    files = list(astronaut_set(8))
    files.insert(3, hopper_set(2)[0])
    files.insert(7, hopper_set(2)[1])
    _, report = analyze_set(ingest(files), dlib)
    outliers = [q.filename for q in report.images if q.outlier]
    assert sorted(outliers) == ["hopper-flip-0.png", "hopper.png"]
    assert not report.passed and "outliers" in report.reasons[0]


def test_image_without_a_face_is_flagged(dlib):
    files = [*astronaut_set(4), no_face()]
    _, report = analyze_set(ingest(files), dlib)
    coffee = report.images[-1]
    assert not coffee.face_found and coffee.flags == ["no_face"]
    assert not report.passed and any("coffee.png" in r for r in report.reasons)


def test_no_faces_at_all_fails_clearly(dlib):
    _, report = analyze_set(ingest([no_face()]), dlib)
    assert report.verdict == "fail" and report.consistency is None
    assert any("no usable face" in r for r in report.reasons)


def test_blurry_and_several_faces_are_reported(dlib):
    blurred = samples.grace_hopper().filter(ImageFilter.GaussianBlur(2.5))
    pair = samples.side_by_side([samples.astronaut(), samples.grace_hopper()])
    files = [("blurred.png", encode(blurred)), ("pair.png", encode(pair)), *hopper_set(2)]
    _, report = analyze_set(ingest(files), dlib)
    by_name = {q.filename: q for q in report.images}
    assert "blurry" in by_name["blurred.png"].flags and "blurry" not in by_name["hopper.png"].flags
    assert "several_faces" in by_name["pair.png"].flags and by_name["pair.png"].face_count >= 2
    assert any("several faces" in w for w in report.warnings)


def test_yaw_estimate_from_landmarks():
    frontal = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], dtype=np.float32)
    turned = frontal.copy()
    turned[2, 0] = 78  # the nose near the right eye: head turned far
    assert abs(yaw_degrees(frontal)) < 1
    assert abs(yaw_degrees(turned)) > 45


def test_contact_sheet_shows_every_reference(dlib):
    images = ingest([*astronaut_set(3), no_face()])
    results, report = analyze_set(images, dlib)
    sheet = contact_sheet([i.image for i in images], results, report)
    assert sheet.width >= 4 * 200
    pixels = np.asarray(sheet)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 100 and green.sum() > 100  # a flagged frame and face boxes are drawn
    Image.open(io.BytesIO(encode(sheet)))  # a valid PNG
