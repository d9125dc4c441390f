"""Feedback as engine jobs: label, undo, reset weights, replay labels after a refit.

Each job drives a :class:`~core.feedback.FeedbackLearner` (which only the engine thread
touches: jobs run one after another) and returns a typed outcome for the session to apply on
its own thread. A label job also re-judges every result of the session and every confirmed
defect under the new model, so the session can tell the operator which NG verdicts a label
would turn into OK *before* it takes effect (issue 11: no silent flips).
"""
from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .detector import Detector, Inspection
from .errors import ImageLoadError
from .feedback import FeedbackLearner, FeedbackRecord
from .imageio import load_image
from .jobs import CancelToken, Progress
from .labels import Label, array_sha256, file_sha256

KIND_TEXT = {"false_alarm": "false alarm", "defect": "real defect", "image_ok": "part OK", "image_ng": "part NG"}
#: embeddings re-scored per pass when re-judging a session's results
RESCORE_CHUNK = 16


@dataclass(frozen=True)
class Rescored:
    """One session result under a changed model."""

    result_id: int
    score: float
    anomaly_map: np.ndarray  # (S, S) float32, read-only


@dataclass(frozen=True)
class LabelOutcome:
    kind: str
    record: FeedbackRecord
    detector: Detector
    labelled: Inspection  # the labelled image under the new model
    sha256: str
    rescored: list[Rescored] = field(default_factory=list)
    #: confirmed defects (earlier labels) judged NG before this label and OK after it
    defects_flipped: int = 0


@dataclass(frozen=True)
class ModelOutcome:
    """The learner's detector after an undo or a weight reset, and the re-judged results."""

    detector: Detector
    rescored: list[Rescored] = field(default_factory=list)


@dataclass(frozen=True)
class ReplayOutcome:
    detector: Detector
    applied: list[int]  # label ids now in the model, in order
    skipped: list[tuple[int, str]]  # (label id, why it could not be replayed)


def rescore(det: Detector, items: Sequence[tuple[int, torch.Tensor]],
            token: CancelToken | None = None) -> list[Rescored]:
    """Score kept embeddings (id, (1, C, h, w)) under ``det`` in chunks."""
    out: list[Rescored] = []
    for lo in range(0, len(items), RESCORE_CHUNK):
        if token is not None:
            token.raise_if_cancelled()
        chunk = items[lo : lo + RESCORE_CHUNK]
        emb = torch.cat([e for _, e in chunk]).to(torch.float32)
        maps, scores = det.maps_and_scores(emb)
        for (rid, _), m, s in zip(chunk, maps, scores):
            m.flags.writeable = False
            out.append(Rescored(rid, float(s), m))
    return out


def _defect_scores(det: Detector, learner: FeedbackLearner) -> np.ndarray:
    embs = learner.defect_embeddings
    if not embs:
        return np.zeros(0)
    return np.array([float(det.maps_and_scores(e.to(torch.float32))[1][0]) for e in embs])


def label_job(learner: FeedbackLearner, kind: str, image: np.ndarray | None, path: str | None,
              mask: np.ndarray | None, rejudge: Sequence[tuple[int, torch.Tensor]],
              token: CancelToken, protect: Sequence[torch.Tensor] = ()) -> Generator[Progress, None, LabelOutcome]:
    """Apply one operator label ("false_alarm"/"defect" on ``mask``, "image_ok"/"image_ng" on
    the whole part). ``protect``: embeddings of the parts judged NG now, which channel
    reweighting must keep NG. On any failure the learner is left exactly as it was."""
    yield Progress(0, 2, f"learning: {KIND_TEXT[kind]}")
    if image is None:
        if path is None:
            raise ImageLoadError("?", "the image of this result is gone and it has no file")
        image = load_image(path, learner.detector.config.bit_depth)
    sha = file_sha256(path) if path else array_sha256(image)
    token.raise_if_cancelled()
    old = learner.detector
    threshold = old.thresholds.image if old.thresholds else None
    defects_before = _defect_scores(old, learner)
    learner.protect(list(protect))
    mark = learner.mark_false_alarm if kind in ("false_alarm", "image_ok") else learner.mark_defect
    try:
        record = mark(image, mask)
        det = learner.detector
        yield Progress(1, 2, f"re-judging {len(rejudge)} results")
        rescored = rescore(det, rejudge, token)
        labelled = det.inspect([image])[0]
        defects_after = _defect_scores(det, learner)[: len(defects_before)]
    except BaseException:
        # a half-applied label leaves no trace in the model. (Not judged by the undo depth:
        # with the undo stack full, a label leaves the depth where it was.)
        if learner.detector is not old:
            learner.undo()
        raise
    flipped = 0
    if threshold is not None and defects_before.size:
        flipped = int(((defects_before > threshold) & (defects_after <= threshold)).sum())
    return LabelOutcome(kind, record, det, labelled, sha, rescored, flipped)


def rescore_job(det: Detector, items: Sequence[tuple[int, torch.Tensor]],
                token: CancelToken) -> Generator[Progress, None, list[Rescored]]:
    """The session's results scored again under a new model (after a fit)."""
    yield Progress(0, len(items), f"re-judging {len(items)} results under the new model")
    return rescore(det, items, token)


def undo_job(learner: FeedbackLearner, rejudge: Sequence[tuple[int, torch.Tensor]],
             token: CancelToken) -> Generator[Progress, None, ModelOutcome]:
    yield Progress(0, 1, "undoing the last label")
    learner.undo()
    return ModelOutcome(learner.detector, rescore(learner.detector, rejudge))


def reset_weights_job(learner: FeedbackLearner, rejudge: Sequence[tuple[int, torch.Tensor]],
                      token: CancelToken) -> Generator[Progress, None, ModelOutcome]:
    yield Progress(0, 1, "resetting channel weights")
    learner.reset_weights()
    return ModelOutcome(learner.detector, rescore(learner.detector, rejudge))


def replay_labels_job(learner: FeedbackLearner, labels: Sequence[Label], token: CancelToken,
                      protect: Sequence[torch.Tensor] = ()) -> Generator[Progress, None, ReplayOutcome]:
    """Apply stored labels, oldest first, to a freshly fitted model.

    A label is replayed only on the very image it was made on (same content hash); a label
    whose image is gone or changed is reported, not guessed at. Each is applied with channel
    reweighting as it was made (``Label.reweight``; not recorded: the learner's setting).
    ``protect``: embeddings of the parts judged NG before the refit, which the replayed
    channel weights must keep NG, as a label made now must (else a refit could pass them
    silently, with weights the live label was refused).
    """
    applied: list[int] = []
    skipped: list[tuple[int, str]] = []
    size = learner.detector.image_size
    setting = learner.reweight
    learner.protect(list(protect))
    try:
        yield from _replay(learner, labels, token, size, setting, applied, skipped)
    finally:
        learner.reweight = setting
    return ReplayOutcome(learner.detector, applied, skipped)


def _replay(learner: FeedbackLearner, labels: Sequence[Label], token: CancelToken, size: int, setting: bool,
            applied: list[int], skipped: list[tuple[int, str]]) -> Generator[Progress, None, None]:
    for i, lab in enumerate(labels):
        token.raise_if_cancelled()
        yield Progress(i, len(labels), f"replaying label #{lab.id}")
        try:
            if file_sha256(lab.image_path) != lab.image_sha256:
                skipped.append((lab.id, "the image file changed since it was labelled"))
                continue
            image = load_image(lab.image_path, learner.detector.config.bit_depth)
        except (OSError, ImageLoadError) as exc:
            skipped.append((lab.id, f"image unavailable: {exc}"))
            continue
        mask = None
        if lab.region is not None:
            mask = lab.region.mask
            if mask.shape != (size, size):
                import cv2

                mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
        learner.reweight = setting if lab.reweight is None else lab.reweight
        if lab.kind in ("false_alarm", "image_ok"):
            learner.mark_false_alarm(image, mask)
        else:
            learner.mark_defect(image, mask)
        applied.append(int(lab.id))
