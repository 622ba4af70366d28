"""Metrics on real faces (dlib on public-domain photos): clean, swapped, faceless, copied, leaking sets."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.eval.metrics import evaluate, score_results
from imagegen.eval.thresholds import COPY_BOUNDS, Gates
from imagegen.faces import threshold
from tests.eval._faces import no_face_images, reference_images


def test_thresholds_come_from_the_backend(dlib_thresholds):
    assert dlib_thresholds.backend == "dlib"
    assert dlib_thresholds.similarity == threshold("dlib")
    assert dlib_thresholds.copy_bound == COPY_BOUNDS["dlib"]
    assert "backend default" in dlib_thresholds.similarity_source


def test_clean_set_scores_high_with_full_detection(identities, astronaut_renders, dlib_thresholds):
    scores = score_results(astronaut_renders, ["astronaut"] * 10, identities, dlib_thresholds)
    assert all(s.passed for s in scores), [s.reasons for s in scores]
    assert all(not s.is_copy and s.reference_similarity < dlib_thresholds.copy_bound for s in scores)
    result = evaluate(scores, dlib_thresholds, characters=["astronaut", "hopper"], bootstrap=500)
    m = result.per_character["astronaut"]
    assert m["detection_rate"] == 1.0 and m["pass_rate"] == 1.0
    assert m["mean_similarity"] > 0.7
    assert m["min_similarity"] > dlib_thresholds.similarity + 0.25
    assert m["p10_similarity"] > 0.7
    assert m["pairwise_mean"] > 0.7
    assert m["copy_rate"] == 0.0 and m["rank1_accuracy"] == 1.0
    assert m["leakage"] < dlib_thresholds.similarity  # nowhere near the other character
    low, high = m["ci"]["mean_similarity"]
    assert low <= m["mean_similarity"] <= high and high - low < 0.1
    assert m["ci"]["detection_rate"] == [1.0, 1.0]
    assert m["verdict"] == "pass" and result.verdict == "pass"
    assert result.summary.startswith("PASS")


def test_two_of_ten_swapped_for_another_person_flags_exactly_those(
    identities, astronaut_renders, hopper_renders, dlib_thresholds
):
    mixed = list(astronaut_renders)
    mixed[3], mixed[7] = hopper_renders[0], hopper_renders[1]
    # one character known: the swapped images fail on similarity alone
    alone = {"astronaut": identities["astronaut"]}
    scores = score_results(mixed, ["astronaut"] * 10, alone, dlib_thresholds)
    assert [i for i, s in enumerate(scores) if not s.passed] == [3, 7]
    for i in (3, 7):
        assert scores[i].face_found and scores[i].similarity < dlib_thresholds.similarity
        assert len(scores[i].reasons) == 1 and "below the dlib threshold" in scores[i].reasons[0]
    # both characters known: the same two, now also identified as Grace Hopper
    scores = score_results(mixed, ["astronaut"] * 10, identities, dlib_thresholds)
    assert [i for i, s in enumerate(scores) if not s.passed] == [3, 7]
    assert [s.identified_as for s in scores].count("hopper") == 2
    assert all("identity leakage: looks more like hopper" in scores[i].reasons[-1] for i in (3, 7))
    result = evaluate(scores, dlib_thresholds, characters=["astronaut", "hopper"], bootstrap=500)
    m = result.per_character["astronaut"]
    assert m["detection_rate"] == 1.0 and m["pass_rate"] == pytest.approx(0.8)
    assert m["rank1_accuracy"] == pytest.approx(0.8)
    assert m["p10_similarity"] < dlib_thresholds.similarity < m["mean_similarity"]
    assert result.verdict == "fail"
    assert any("rank1_accuracy 0.800 fails" in r for r in result.reasons)


def test_a_set_without_faces_has_detection_zero_and_a_clear_verdict(dlib, identities, dlib_thresholds):
    results = [dlib.largest(image) for image in no_face_images(6)]
    scores = score_results(results, ["astronaut"] * 6, identities, dlib_thresholds)
    assert all(not s.face_found and s.similarity is None and s.reasons == ["no face detected"] for s in scores)
    result = evaluate(scores, dlib_thresholds, characters=["astronaut", "hopper"], bootstrap=200)
    m = result.per_character["astronaut"]
    assert m["detection_rate"] == 0.0 and m["n_faces"] == 0
    assert m["mean_similarity"] is None and m["copy_rate"] is None and m["rank1_accuracy"] is None
    assert result.verdict == "fail"
    assert "no face detected in any of the 6 images (detection rate 0%)" in result.reasons[0]
    assert result.summary == "FAIL: no face detected in any of the 6 images (detection rate 0%)"
    not_measurable = [g for g in m["gates"] if g["passed"] is None]
    assert {g["metric"] for g in not_measurable} == {"mean_similarity", "copy_rate", "rank1_accuracy"}
    # the same set in a report-only run says so instead of failing
    report_only = evaluate(scores, dlib_thresholds, characters=["astronaut"], gated=False, bootstrap=50)
    assert report_only.verdict == "ungated"
    assert "no face detected in any render" in report_only.summary
    assert all(r.startswith("(not gated)") for r in report_only.reasons)


def test_a_render_that_copies_a_reference_is_flagged(dlib, identities, astronaut_renders, dlib_thresholds):
    copies = [dlib.largest(image) for image in reference_images("astronaut")[:2]]  # the photo, re-lit
    scores = score_results(copies + astronaut_renders[:3], ["astronaut"] * 5, identities, dlib_thresholds)
    assert [s.is_copy for s in scores] == [True, True, False, False, False]
    assert scores[0].reference_similarity == pytest.approx(1.0, abs=1e-5)
    assert "copy-paste" in scores[0].reasons[0] and scores[0].nearest_reference == "astronaut-ref0"
    m = evaluate(scores, dlib_thresholds, characters=["astronaut", "hopper"], bootstrap=200).per_character["astronaut"]
    assert m["copy_rate"] == pytest.approx(0.4)
    assert not next(g for g in m["gates"] if g["metric"] == "copy_rate")["passed"]


def test_leakage_and_verification_on_two_characters(identities, astronaut_renders, hopper_renders, dlib_thresholds):
    renders = astronaut_renders + hopper_renders
    truth = ["astronaut"] * 10 + ["hopper"] * 6
    clean = evaluate(
        score_results(renders, truth, identities, dlib_thresholds),
        dlib_thresholds,
        characters=["astronaut", "hopper"],
        bootstrap=300,
    )
    assert clean.verdict == "pass"
    ver = clean.overall["verification"]
    assert ver["auc"] == 1.0 and ver["eer"] == 0.0
    assert ver["same_pairs"] == 45 + 15 and ver["different_pairs"] == 60
    assert dlib_thresholds.similarity < ver["eer_threshold"] < 0.7
    assert clean.overall["rank1_accuracy"] == 1.0
    for name in ("astronaut", "hopper"):
        m = clean.per_character[name]
        assert m["verification"]["auc"] == 1.0 and m["rank1_accuracy"] == 1.0
        assert m["leakage"] < dlib_thresholds.similarity < m["mean_similarity"]

    # a method that leaks: half of Hopper's renders come out as the astronaut
    leaky_renders = astronaut_renders + astronaut_renders[:3] + hopper_renders[3:]
    leaky = evaluate(
        score_results(leaky_renders, truth, identities, dlib_thresholds),
        dlib_thresholds,
        characters=["astronaut", "hopper"],
        bootstrap=300,
    )
    h = leaky.per_character["hopper"]
    assert h["rank1_accuracy"] == pytest.approx(0.5)
    assert h["leakage"] > clean.per_character["hopper"]["leakage"] + 0.2
    assert h["max_leakage"] > 0.7  # renders that are the other character
    assert leaky.overall["verification"]["auc"] < 0.8 < clean.overall["verification"]["auc"]
    assert leaky.overall["verification"]["eer"] > 0.2
    assert leaky.per_character["hopper"]["verdict"] == "fail"


def test_confidence_intervals_are_seeded(identities, astronaut_renders, hopper_renders, dlib_thresholds):
    mixed = list(astronaut_renders)
    mixed[3], mixed[7] = hopper_renders[0], hopper_renders[1]
    scores = score_results(mixed, ["astronaut"] * 10, identities, dlib_thresholds)
    gates = Gates(min_rank1_accuracy=None)

    def ci(seed):
        return evaluate(scores, dlib_thresholds, gates, characters=["astronaut"], bootstrap=400, seed=seed).overall[
            "ci"
        ]

    first, again, other = ci(5), ci(5), ci(6)
    assert first == again and first != other
    low, high = first["pass_rate"]
    assert low < 0.8 <= high
    assert np.isfinite(first["mean_similarity"]).all()
