"""OK/NG Station engine: images in, anomaly maps, scores and verdicts out. No Qt here.

The public API, usable from scripts, the CLI and the GUI alike::

    from core import DetectorConfig, CancelToken, fit_job, run_job, load_image
    result = run_job(fit_job(ok_paths, DetectorConfig(), CancelToken()))
    det = result.detector
    inspection = det.inspect([load_image("part.png")])[0]
"""
from __future__ import annotations

__version__ = "0.1.0"

#: public name -> the module that defines it. Imported on first use (PEP 562), not here:
#: ``import core.cli`` or inspection from an exported graph (core.lean_inspection) must not
#: pay for PyTorch and timm (seconds of start-up) when they never run the backbone.
_EXPORTS = {
    "PostProcess": "anomaly_map",
    "DEFAULT_BACKBONE": "backbone_spec", "BackboneSpec": "backbone_spec", "FeatureExtractor": "backbone",
    "Detector": "detector", "DetectorConfig": "detector", "Inspection": "detector",
    "BackboneUnavailableError": "errors", "Cancelled": "errors", "ImageLoadError": "errors",
    "ModelFileError": "errors", "NotFittedError": "errors", "OkngError": "errors",
    "iter_image_paths": "imageio", "load_image": "imageio",
    "CancelToken": "jobs", "FitResult": "jobs", "Progress": "jobs", "ScoredImage": "jobs", "Skipped": "jobs",
    "fit_job": "jobs", "inspect_job": "jobs", "inspect_paths": "jobs", "run_job": "jobs",
    "MODELS": "models",
    "load_detector": "persistence", "save_detector": "persistence",
    "Region": "regions", "find_regions": "regions", "region_at": "regions",
    "Thresholds": "thresholds", "calibrate": "thresholds", "verdict": "thresholds",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "BackboneSpec", "BackboneUnavailableError", "CancelToken", "Cancelled", "DEFAULT_BACKBONE",
    "Detector", "DetectorConfig", "FeatureExtractor", "FitResult", "ImageLoadError", "Inspection",
    "MODELS", "ModelFileError", "NotFittedError", "OkngError", "PostProcess", "Progress", "Region",
    "ScoredImage", "Skipped", "Thresholds", "calibrate", "find_regions", "fit_job", "inspect_job", "inspect_paths",
    "iter_image_paths", "load_detector", "load_image", "region_at", "run_job", "save_detector", "verdict",
]
