"""OK/NG Station engine: images in, anomaly maps, scores and verdicts out. No Qt here.

The public API, usable from scripts, the CLI and the GUI alike::

    from core import DetectorConfig, CancelToken, fit_job, run_job, load_image
    result = run_job(fit_job(ok_paths, DetectorConfig(), CancelToken()))
    det = result.detector
    inspection = det.inspect([load_image("part.png")])[0]
"""
from __future__ import annotations

__version__ = "0.1.0"

from .anomaly_map import PostProcess  # noqa: E402
from .backbone import DEFAULT_BACKBONE, BackboneSpec, FeatureExtractor  # noqa: E402
from .detector import Detector, DetectorConfig, Inspection  # noqa: E402
from .errors import (  # noqa: E402
    BackboneUnavailableError,
    Cancelled,
    ImageLoadError,
    ModelFileError,
    NotFittedError,
    OkngError,
)
from .imageio import iter_image_paths, load_image  # noqa: E402
from .jobs import CancelToken, FitResult, Progress, ScoredImage, Skipped, fit_job, inspect_job, inspect_paths, run_job  # noqa: E402
from .models import MODELS  # noqa: E402
from .persistence import load_detector, save_detector  # noqa: E402
from .regions import Region, find_regions, region_at  # noqa: E402
from .thresholds import Thresholds, calibrate, verdict  # noqa: E402

__all__ = [
    "BackboneSpec", "BackboneUnavailableError", "CancelToken", "Cancelled", "DEFAULT_BACKBONE",
    "Detector", "DetectorConfig", "FeatureExtractor", "FitResult", "ImageLoadError", "Inspection",
    "MODELS", "ModelFileError", "NotFittedError", "OkngError", "PostProcess", "Progress", "Region",
    "ScoredImage", "Skipped", "Thresholds", "calibrate", "find_regions", "fit_job", "inspect_job", "inspect_paths",
    "iter_image_paths", "load_detector", "load_image", "region_at", "run_job", "save_detector", "verdict",
]
