"""Click-to-label feedback: a marked false alarm changes the model before the next image.

Mechanisms:

* **Feedback memory** (issue 11, :mod:`core.feedback_memory`) - the hot patches of the marked
  region (a whole image's for "this part is OK") are accepted as normal *wherever* that
  appearance shows up next, with a scale learnt from the clicks; confirmed defects are kept
  as negatives. Applied in :meth:`Detector.maps_and_scores`, so every score sees it.
* **Position-tied update** (issue 4; off by default while the memory generalises,
  ``position_update=True`` or ``generalise=False``) - the region's embeddings go into the
  normality model's ``partial_fit`` with a patch mask: for PaDiM an exact update of those
  patches' Gaussian statistics, for a memory-bank model an addition to the bank.
* **Per-channel reweighting** - every false alarm tells which channels drove its distance
  (each channel's share of ``d^2 = sum_k d_k (P d)_k``). Channels that carry more than their
  share of false-alarm distance, and less of confirmed-defect distance, get a weight below
  one. The strength is chosen by a guard: the strongest setting under which every confirmed
  defect, and every part currently judged NG (:meth:`FeedbackLearner.protect`), still scores
  above the threshold.

After any change the held-out OK embeddings are re-scored: the thresholds an engineer set
stay where they are, and the expected false-alarm rate shown for them is re-measured on
unseen parts for the new model. Every change is undoable (bounded
stack of detector snapshots).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .detector import Detector
from .models.base import patches_first
from .models.mahalanobis import unpack_symmetric

#: strengths tried by the guard, strongest first (0 = no reweighting)
STRENGTHS = (1.0, 0.5, 0.25, 0.0)
MIN_WEIGHT = 0.2
#: most patches one click puts into the feedback memory
MAX_ACCEPT = 128


@dataclass(frozen=True)
class WeightChange:
    """What reweighting did, for the engineer: per stage and the most lowered channels."""

    strength: float | None  # None: not a change, the weights the model holds (after a fit or an open)
    stage_mean_weight: dict[str, float]
    lowest: list[tuple[int, float]]  # (channel index into the backbone's stages, weight)


@dataclass(frozen=True)
class WeightGuard:
    """Why reweighting stopped short of its full strength: the strengths it refused, and what
    made it refuse them (a strength is refused at the first guarded part it would pass)."""

    refused: tuple[float, ...]
    defects: int  # refusals for a confirmed defect ("real defect" labels)
    parts: tuple[int, ...]  # protected parts (their order as given to ``protect``) that stopped one
    removed: bool = False  # the weights the model held were taken out (only "no weights" passed the guard)


@dataclass(frozen=True)
class FeedbackRecord:
    kind: str
    patches: int
    score_before: float
    score_after: float
    threshold_before: float | None
    threshold_after: float | None
    expected_false_alarm_rate: float | None
    seconds: float
    weights: WeightChange | None = None
    guard: WeightGuard | None = None  # what reweighting refused (None: nothing)


def region_patch_mask(region_mask: np.ndarray | None, grid: tuple[int, int], dilate: int = 1) -> torch.Tensor:
    """(S, S) bool region in map pixels -> (1, h, w) bool patches it touches (+ ring).

    The ring covers the neighbouring patches whose distances the blur spread into the
    marked outline.
    """
    h, w = grid
    if region_mask is None:
        return torch.ones(1, h, w, dtype=torch.bool)
    small = cv2.resize(region_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0
    if dilate > 0:
        k = np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8)
        small = cv2.dilate(small.astype(np.uint8), k) > 0
    return torch.from_numpy(small)[None]


def channel_shares(det: Detector, emb: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked patches of each channel's share of the squared distance, (C,).

    Uses the model's Gaussian view when it has one (PaDiM family); otherwise the squared
    deviation from the patch mean of the OK data, which is the Euclidean analogue.
    """
    model = det.model
    x = patches_first(model.weighted(emb))[:, 0, :]  # (P, C), one image
    sel = patches_first(patch_mask[:, None].float())[:, 0, 0] > 0
    view = model.gaussian_view(torch.nonzero(sel).flatten())
    if view is None:
        diff = x[sel]
        contrib = diff * diff
    else:
        mean, prec = view
        w = model.channel_weights
        mu = mean * (w if w is not None else 1.0)
        diff = x[sel] - mu
        full = unpack_symmetric(prec, diff.shape[-1])
        contrib = diff * torch.einsum("pcd,pd->pc", full, diff)
    total = contrib.sum(-1, keepdim=True).clamp_min(1e-12)
    return (contrib / total).mean(0)


@dataclass
class FeedbackLearner:
    """Applies operator labels to a detector; keeps the evidence and an undo stack."""

    detector: Detector
    max_undo: int = 10
    #: off by default: on the ELPV demo it moved the operating point without re-ranking parts
    #: (README, feedback figures); it pays off where false alarms share channels, e.g. a
    #: recurring texture or lighting change.
    reweight: bool = False
    #: position-free memory (issue 11): a false-alarm region is accepted wherever it shows up
    generalise: bool = True
    #: FeedbackMemory parameters used when the detector has no memory yet (e.g. ``radius``)
    memory_params: dict = field(default_factory=dict)
    #: accepted patches: those of the clicked region whose distance reaches this share of
    #: the pixel threshold (the outline is wider than the mark; a tighter set costs less
    #: detection)
    accept_level: float = 0.8
    #: also the model's own update at the clicked positions (PaDiM: exact per-position
    #: statistics; PatchCore: bank rows). Off while the memory generalises: on the recurring
    #: mark benchmark it cost detection (defects at clicked places) and bought nothing the
    #: memory does not; always on with ``generalise=False`` (the issue-4 behaviour)
    position_update: bool = False
    #: which neighbours count in an accepted patch's block: "accepted" (only accepted
    #: patches: the appearance itself) or "region" (the whole clicked outline, its margin too)
    block_context: str = "region"
    fa_shares: list[torch.Tensor] = field(default_factory=list)
    defect_shares: list[torch.Tensor] = field(default_factory=list)
    defect_embeddings: list[torch.Tensor] = field(default_factory=list)
    #: embeddings of parts currently judged NG (set by :meth:`protect`): reweighting keeps
    #: each of them above the image threshold, like confirmed defects
    protected_embeddings: list[torch.Tensor] = field(default_factory=list)
    _undo: list[tuple[Detector, int, int, int]] = field(default_factory=list)
    #: the model's own distances of the held-out OK images, and the detector they belong to:
    #: a click that changes only the memory re-scores those images without running the model
    #: again (PatchCore: 1.4 s of a 1.6 s click)
    _calibration: tuple[weakref.ref, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """A detector loaded from a file brings the evidence its labels left (see
        :attr:`core.detector.Detector.feedback_evidence`): reweighting goes on from it."""
        ev = self.detector.feedback_evidence
        if ev and not (self.fa_shares or self.defect_shares or self.defect_embeddings):
            self.fa_shares = list(ev["fa_shares"].unbind(0))
            self.defect_shares = list(ev["defect_shares"].unbind(0))
            self.defect_embeddings = [e[None] for e in ev["defect_embeddings"].unbind(0)]

    def _keep_evidence(self) -> None:
        """Hand the current evidence to the detector (it is saved with the model)."""
        c, (h, w) = self.detector.model.n_channels, self.detector.model.grid
        if not (self.fa_shares or self.defect_shares or self.defect_embeddings):
            self.detector.feedback_evidence = None
            return
        self.detector.feedback_evidence = {
            "fa_shares": torch.stack(self.fa_shares).float() if self.fa_shares else torch.zeros(0, c),
            "defect_shares": torch.stack(self.defect_shares).float() if self.defect_shares else torch.zeros(0, c),
            "defect_embeddings": (torch.cat(self.defect_embeddings).to(torch.float16) if self.defect_embeddings
                                  else torch.zeros(0, c, h, w, dtype=torch.float16)),
        }

    def _push(self) -> Detector:
        """Keep the current detector for :meth:`undo` and go on with a copy of it (returned).
        The kept one is the very object the caller and the session hold (one copy per label,
        not two: a copy of a PaDiM detector takes ~40 ms); the learner never changes it again,
        the session at most rebinds its thresholds until the label applies, and puts its own
        thresholds into whatever model an undo gives back."""
        new = self.detector.copy()  # first: a failing copy leaves the undo stack as it was
        self._undo.append((self.detector, len(self.fa_shares), len(self.defect_shares),
                           len(self.defect_embeddings)))
        del self._undo[: -self.max_undo]
        self.detector = new
        return new

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def undo_depth(self) -> int:
        """How many changes :meth:`undo` can take back."""
        return len(self._undo)

    def clear_undo(self) -> None:
        """Make the current detector the base (after replaying stored labels on a refit)."""
        self._undo.clear()

    def undo(self) -> bool:
        """Put back the detector as it was before the last label."""
        if not self._undo:
            return False
        det, n_fa, n_def, n_emb = self._undo.pop()
        self.detector = det
        del self.fa_shares[n_fa:], self.defect_shares[n_def:], self.defect_embeddings[n_emb:]
        return True

    def protect(self, embeddings: torch.Tensor | list[torch.Tensor] | None) -> int:
        """Tell the learner which parts are judged NG right now: ``embeddings`` (N, C, h, w)
        or a list of (1, C, h, w) / (C, h, w) (None or empty: none). Replaces the previous
        set. Reweighting then never passes one of them (strength is lowered, or weights stay
        as they were). Returns how many are protected."""
        if embeddings is None:
            items: list[torch.Tensor] = []
        elif isinstance(embeddings, torch.Tensor):
            e = embeddings if embeddings.dim() == 4 else embeddings[None]
            items = [e[i : i + 1] for i in range(e.shape[0])]
        else:
            items = [e if e.dim() == 4 else e[None] for e in embeddings]
        self.protected_embeddings = [e.detach().to(torch.float16) for e in items]
        return len(self.protected_embeddings)

    def _score(self, emb: torch.Tensor) -> float:
        return float(self.detector.maps_and_scores(emb)[1][0])

    def mark_false_alarm(self, image: np.ndarray | torch.Tensor,
                         region_mask: np.ndarray | None = None) -> FeedbackRecord:
        """"This is fine": add the region (or whole image if None) to the OK memory, reweight."""
        t0 = time.perf_counter()
        emb = image if isinstance(image, torch.Tensor) else self.detector.embed([image])
        before = self._score(emb)
        th_before = self.detector.thresholds.image if self.detector.thresholds else None
        model_changes = self.position_update or not self.generalise or self.reweight
        cached = None if model_changes else self._calibration_distances()
        det = self._push()  # a failure from here on is undone by identity
        mask = region_patch_mask(region_mask, det.model.grid)
        self.fa_shares.append(channel_shares(det, emb, mask))
        if self.generalise:
            self._remember(det, emb, region_mask, mask)
        if self.position_update or not self.generalise:
            det.model.partial_fit(emb, mask)
        det.finalize()
        change, guard = self._reweight() if self.reweight else (None, None)
        self._refresh(cached)
        self._keep_evidence()
        kind = "image_ok" if region_mask is None else "false_alarm"
        return self._record(kind, mask, emb, before, th_before, t0, change, guard)

    def mark_defect(self, image: np.ndarray | torch.Tensor, region_mask: np.ndarray | None = None) -> FeedbackRecord:
        """"This is a real defect": remember it so reweighting never hides it."""
        t0 = time.perf_counter()
        emb = image if isinstance(image, torch.Tensor) else self.detector.embed([image])
        before = self._score(emb)
        th_before = self.detector.thresholds.image if self.detector.thresholds else None
        cached = None if self.reweight else self._calibration_distances()
        self._push()
        if region_mask is None:  # the hottest quarter of patches stands for the defect
            d = self.detector.model.score(emb)[0]
            mask = (d >= torch.quantile(d.flatten(), 0.75))[None]
        else:
            mask = region_patch_mask(region_mask, self.detector.model.grid, dilate=0)
        self.defect_shares.append(channel_shares(self.detector, emb, mask))
        self.defect_embeddings.append(emb.to(torch.float16))
        if self.generalise:
            self.detector.ensure_memory(**self.memory_params).add_defect(emb[:1], mask[0])
        change, guard = self._reweight() if self.reweight and self.fa_shares else (None, None)
        self._refresh(cached)
        self._keep_evidence()
        kind = "defect" if region_mask is not None else "image_ng"
        return self._record(kind, mask, emb, before, th_before, t0, change, guard)

    def _calibration_distances(self) -> torch.Tensor | None:
        """The current model's distances of the held-out OK images (cached per detector)."""
        det = self.detector
        if det.thresholds is None or det.calibration_embeddings is None:
            return None
        if self._calibration is None or self._calibration[0]() is not det:
            self._calibration = (weakref.ref(det), det.calibration_model_distances())
        return self._calibration[1]

    def _refresh(self, cached: torch.Tensor | None) -> None:
        """Re-score the held-out OK images after a label; ``cached``: the model's distances
        from before it, when the label left the model itself unchanged (memory only)."""
        self.detector.refresh_calibration(cached)
        if cached is not None:
            self._calibration = (weakref.ref(self.detector), cached)

    def _remember(self, det: Detector, emb: torch.Tensor, region_mask: np.ndarray | None, mask: torch.Tensor) -> None:
        """Put the clicked appearance into the position-free memory: the patches of the
        clicked region whose own model distance reaches ``accept_level`` x the pixel threshold
        (the outline is wider than the mark; its cool margin only gives the blocks context).
        A whole "part is OK" accepts its hot patches."""
        with torch.inference_mode():
            d = det.model.score(emb[:1])[0]
        inside = mask[0] if region_mask is None else region_patch_mask(region_mask, det.model.grid, dilate=0)[0]
        th = det.thresholds
        level = self.accept_level * th.pixel if th is not None else 0.5 * float(d[inside].max())
        accept = inside & (d >= level)
        if int(accept.sum()) > MAX_ACCEPT:  # the hottest of a very large area
            flat = torch.where(accept, d, torch.full_like(d, -1.0)).flatten()
            accept = torch.zeros(flat.numel(), dtype=torch.bool)
            accept[torch.topk(flat, MAX_ACCEPT).indices] = True
            accept = accept.reshape(d.shape)
        if not bool(accept.any()):  # nothing hot: the region's peak patch stands for it
            flat = torch.where(inside, d, torch.full_like(d, -1.0)).flatten()
            accept = torch.zeros(flat.numel(), dtype=torch.bool)
            accept[int(flat.argmax())] = True
            accept = accept.reshape(d.shape)
        context = accept if self.block_context == "accepted" else mask[0]
        det.ensure_memory(**self.memory_params).add(emb[:1], accept, context, reference=det.calibration_embeddings)

    def reset_weights(self) -> None:
        self._push()
        self.detector.model.set_channel_weights(None)
        self.fa_shares.clear()
        self.defect_shares.clear()
        self.detector.refresh_calibration()
        self._keep_evidence()

    # -- reweighting --------------------------------------------------------------------
    def _candidate_weights(self, strength: float) -> torch.Tensor | None:
        c = self.detector.model.n_channels
        fa = torch.stack(self.fa_shares).mean(0)
        excess = (fa - 1.0 / c).clamp_min(0.0)
        if self.defect_shares:
            dfct = torch.stack(self.defect_shares).mean(0)
            excess = torch.where(dfct >= fa, torch.zeros_like(excess), excess)  # defect channels stay
        if strength == 0.0 or float(excess.max()) <= 0:
            return None
        w = 1.0 / (1.0 + strength * c * excess)
        return w.clamp_min(MIN_WEIGHT).to(torch.float32)

    def _defects_still_caught(self) -> bool:
        """Every confirmed defect still scores above the image threshold."""
        det = self.detector
        if det.thresholds is None:
            return True
        return all(self._score(e.to(torch.float32)) > det.thresholds.image for e in self.defect_embeddings)

    def _keep_ok_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Rescale weights so held-out OK parts keep their median score.

        Distances are homogeneous in a global weight scale, so this is exact: lowering a
        few channels cannot pass as an improvement by shrinking every score (which would only
        move the operating point); what remains is a change in how parts are ranked.
        """
        det = self.detector
        if det.calibration_embeddings is None or det.thresholds is None or det.thresholds.calibration_scores.size == 0:
            return w
        before = float(np.median(det.thresholds.calibration_scores))
        det.model.set_channel_weights(w)
        after = float(np.median(det.calibration_scores()[0]))
        return w * (before / after) if after > 0 else w

    def _reweight(self) -> tuple[WeightChange | None, WeightGuard | None]:
        """The strongest weights (of :data:`STRENGTHS`) under which every confirmed defect and
        every protected part that is NG under the updated model with the previous weights
        stays NG; the previous weights when none is. Returns the change (None: weights
        removed or kept) and what was refused (None: nothing).

        The protected parts are judged lazily: under a candidate only those it would pass
        are scored again with the previous weights (a part already OK there is no flip), and
        a part that stopped a candidate is tried first under the next one. The same decision
        as judging every protected part first, at a fraction of the scoring: a session of
        200 results with 106 judged NG spent 0.7 s of its 1.3 s click scoring them."""
        model = self.detector.model
        if not model.supports_channel_weights:  # trained models: the memory alone learns
            return None, None
        previous = model.channel_weights
        self.detector.refresh_calibration()  # OK scores under the updated memory, old weights
        th = self.detector.thresholds
        protected = self.protected_embeddings if th is not None else []  # float16: converted when scored
        was_ng: dict[int, bool] = {}  # protected part -> NG under the updated memory, old weights
        first: list[int] = []  # parts that stopped a candidate: tried first under the next
        refused: list[float] = []
        by_defect = 0

        def judged_ng(i: int) -> bool:
            if i not in was_ng:
                current = model.channel_weights
                model.set_channel_weights(previous)
                was_ng[i] = self._score(protected[i].to(torch.float32)) > th.image
                model.set_channel_weights(current)
            return was_ng[i]

        def still_ng(w: torch.Tensor | None) -> bool:
            if not protected or _same_weights(w, previous):  # judged under these very weights
                return True
            for i in first + [i for i in range(len(protected)) if i not in first]:
                if self._score(protected[i].to(torch.float32)) <= th.image and judged_ng(i):
                    if i not in first:
                        first.insert(0, i)
                    return False
            return True

        def guard(removed: bool = False) -> WeightGuard | None:
            return WeightGuard(tuple(refused), by_defect, tuple(sorted(first)), removed) if refused else None

        for strength in STRENGTHS:
            w = self._candidate_weights(strength)
            if w is not None:
                w = self._keep_ok_scale(w)
            model.set_channel_weights(w)
            if not self._defects_still_caught():
                by_defect += 1
            elif still_ng(w):
                return (None if w is None else self._describe(w, strength)), guard(w is None and previous is not None)
            refused.append(strength)
        model.set_channel_weights(previous)  # under these, every guarded part was NG
        return None, guard()

    def held_weights(self) -> WeightChange | None:
        """The channel weights the current model holds, described as a change would be
        (strength None); None when it holds none."""
        w = self.detector.model.channel_weights if self.detector.model.supports_channel_weights else None
        return None if w is None else self._describe(w, None)

    def _describe(self, w: torch.Tensor, strength: float | None) -> WeightChange:
        emb = self.detector.embedder
        stages = self.detector.extractor.spec.stages
        per_stage = {f"stage {stages[s]}": float(w[torch.from_numpy(emb.channel_stage == s)].mean())
                     for s in range(len(stages)) if (emb.channel_stage == s).any()}
        order = torch.argsort(w)[:5]
        return WeightChange(strength, per_stage, [(int(emb.channel_idx[i]), float(w[i])) for i in order])

    def _record(self, kind, mask, emb, before, th_before, t0, change, guard=None) -> FeedbackRecord:
        th = self.detector.thresholds
        return FeedbackRecord(
            kind=kind, patches=int(mask.sum()), score_before=before, score_after=self._score(emb),
            threshold_before=th_before, threshold_after=th.image if th else None,
            expected_false_alarm_rate=th.expected_false_alarm_rate() if th else None,
            seconds=time.perf_counter() - t0, weights=change, guard=guard,
        )


def _same_weights(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Both none, or equal channel weights."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))
