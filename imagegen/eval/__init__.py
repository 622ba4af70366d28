"""Evaluation: consistency metrics, regression suites, run comparison, calibration, reports.

- :mod:`imagegen.eval.metrics`: per-image scores and set metrics over any face backend.
- :mod:`imagegen.eval.suite`: suites (``configs/suites/*.yaml``) and their render grid.
- :mod:`imagegen.eval.run`: ``eval run`` (render through a Ray actor pool, score) and ``eval score``.
- :mod:`imagegen.eval.compare`: metric changes between two runs with bootstrap intervals.
- :mod:`imagegen.eval.calibrate`: EER thresholds from labelled pairs.
- :mod:`imagegen.eval.report`: ``report.html`` and ``junit.xml``.

Heavy modules (Ray, matplotlib, the renderer) are imported only where they are used.
"""

from importlib import import_module
from typing import Any

#: public name -> module; imported on first use so `imagegen --help` stays fast
_EXPORTS = {
    "CharacterIdentity": "identities",
    "identity_from_images": "identities",
    "identity_from_sample": "identities",
    "Evaluation": "metrics",
    "ImageScore": "metrics",
    "evaluate": "metrics",
    "score_image": "metrics",
    "score_results": "metrics",
    "set_metrics": "metrics",
    "Gates": "thresholds",
    "ImageThresholds": "thresholds",
    "ResolvedThresholds": "thresholds",
    "resolve_thresholds": "thresholds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imagegen.eval' has no attribute {name!r}")
    return getattr(import_module(f"imagegen.eval.{module}"), name)
