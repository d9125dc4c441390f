"""Fit and inspection jobs, specified where mutation testing found them unspecified (issue 18):
a fit reuses the backbone it is given; a kept image comes with its file's SHA-256 (what the
results log and the labels record); (round 6) an inspection's summary counts, saving says so."""
import hashlib
from pathlib import Path

from core import CancelToken, fit_job, run_job
from core.jobs import inspect_job


def test_a_fit_reuses_the_backbone_it_is_given(tiny_config, part_images):
    ok, _ = part_images
    first = run_job(fit_job(ok, tiny_config, CancelToken())).detector
    again = run_job(fit_job(ok, tiny_config, CancelToken(), extractor=first.extractor)).detector
    assert again.extractor is first.extractor  # the station's loaded backbone: no second load


def test_a_kept_image_comes_with_the_sha256_of_its_file(tiny_config, part_images, tmp_path):
    ok, ng = part_images
    det = run_job(fit_job(ok, tiny_config, CancelToken())).detector
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"not an image")
    paths = [ng[0], str(unreadable), ok[0], ng[1]]
    items = []
    summary = run_job(inspect_job(paths, det, CancelToken(), keep_images=True, batch_size=2),
                      on_progress=lambda p: items.append(p.item))
    assert (summary.scored, summary.skipped) == (3, 1)
    scored = [i for i in items if hasattr(i, "inspection")]
    assert [i.path for i in scored] == [ng[0], ok[0], ng[1]]
    assert [i.sha256 for i in scored] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in
                                          (ng[0], ok[0], ng[1])]


def test_a_fit_says_when_it_builds_the_model_and_prepares_the_runtime_after_all_images(tiny_config, part_images):
    """What the status line shows after the last image: PatchCore's coreset or an export can
    take a minute, and the bar stands at all images meanwhile."""
    ok, _ = part_images
    progress = []
    run_job(fit_job(ok, tiny_config, CancelToken()), on_progress=progress.append)
    assert [(p.done, p.total, p.message) for p in progress[-2:]] == [
        (len(ok), len(ok), "building the model"), (len(ok), len(ok), "preparing the inspection runtime")]


def test_saving_a_model_says_so_with_the_files_name(tiny_config, part_images, tmp_path):
    from core.jobs import save_model_job

    det = run_job(fit_job(part_images[0], tiny_config, CancelToken())).detector
    progress = []
    run_job(save_model_job(det, tmp_path / "line 3.safetensors", CancelToken()), on_progress=progress.append)
    assert [(p.done, p.total, p.message) for p in progress] == [(0, 1, "saving model line 3.safetensors")]
    assert (tmp_path / "line 3.safetensors").is_file()


def test_a_fit_without_held_out_images_warns_that_thresholds_must_be_set_by_hand(tiny_config, part_images, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="core.jobs"):
        det = run_job(fit_job(part_images[0][:4], tiny_config, CancelToken())).detector  # fewer than 5
    assert det.thresholds is None
    assert any("no OK images held out for calibration" in r.getMessage() for r in caplog.records)
