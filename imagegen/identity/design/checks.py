"""The face check shown under every candidate, upload and slot: face found, apparent age, protected match.

The same safeguards registration runs (``identity/safeguards.py``), applied to one image at a time
so an artist sees at once which candidate is unusable. A check never raises for a missing face:
tiny presets render noise, and "no face" is an answer, not an error. ``refuse_pick`` is the
strict form for an artist's pick: a face matching a protected identity, or one that looks younger
than the age gate allows, refuses the pick before anything is rendered from it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imagegen.faces import FaceAnalyzer, FaceResult
from imagegen.identity.safeguards import AgeEstimator, AgeGateError, ProtectedIdentityMatchError, protected_matches
from imagegen.settings import Settings

#: face analyses one checker keeps (by pixel digest)
ANALYSED_CACHE = 256


@dataclass(frozen=True)
class FaceCheck:
    found: bool
    age: float | None
    protected_match: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"found": self.found, "age": self.age, "protected_match": self.protected_match, "note": self.note}


class FaceChecker:
    """Runs the per-image face check with one analyser, the registry's protected gallery and the age estimator."""

    def __init__(self, analyzer: FaceAnalyzer, registry, estimator: AgeEstimator | None, settings: Settings):
        self.analyzer = analyzer
        self.registry = registry
        self.estimator = estimator
        self.min_age = settings.min_apparent_age
        #: face analyses by pixel digest: a curate step re-reports kept slots without analysing them again
        self._analysed: OrderedDict[str, FaceResult] = OrderedDict()
        self._lock = threading.Lock()

    def analyse(self, image: Image.Image, digest: str | None = None) -> FaceResult:
        """The image's largest face (cached by ``digest``, the image's pixel digest, when given)."""
        if digest is not None:
            with self._lock:
                if digest in self._analysed:
                    self._analysed.move_to_end(digest)
                    return self._analysed[digest]
        result = self.analyzer.largest(image)
        if digest is not None:
            with self._lock:
                self._analysed[digest] = result
                while len(self._analysed) > ANALYSED_CACHE:
                    self._analysed.popitem(last=False)
        return result

    def check(
        self, image: Image.Image, name: str, result: FaceResult | None = None, digest: str | None = None
    ) -> FaceCheck:
        result = result if result is not None else self.analyse(image, digest)
        if not result.found:
            return FaceCheck(False, None, False, "no face")
        matches = protected_matches(self.registry, [result], [name], self.analyzer.name)
        age = None
        if self.estimator is not None:
            faces = [result.face, *result.others]
            age = round(min(self.estimator.estimate(np.asarray(image.convert("RGB")), f) for f in faces), 1)
        notes = ["face found" + (f" ({result.count} faces)" if result.multiple else "")]
        if matches:
            notes.append("matches a protected identity")
        if age is not None and age < self.min_age:
            notes.append(f"looks younger than {self.min_age} (~{age:.0f})")
        elif age is None:
            notes.append("apparent age not checked (no estimator installed)")
        return FaceCheck(True, age, bool(matches), "; ".join(notes))

    def refuse_pick(self, images: Sequence[tuple[str, Image.Image, str]]) -> list[FaceCheck]:
        """Check a pick ((name, image, pixel digest) each); raise the registration safeguards' errors for a
        protected match or a young face."""
        checks = [self.check(image, name, digest=digest) for name, image, digest in images]
        for (name, _, _), check in zip(images, checks, strict=True):
            if check.protected_match:
                raise ProtectedIdentityMatchError(
                    f"{name} matches a protected identity; characters must be fictional or consented, "
                    "so it cannot be a design's pick"
                )
            if check.age is not None and check.age < self.min_age:
                raise AgeGateError(
                    f"{name}: the face looks younger than {self.min_age} (~{check.age:.0f}); characters must "
                    "look clearly adult"
                )
        return checks
