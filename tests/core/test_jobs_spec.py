"""Fit and inspection jobs, specified where mutation testing found them unspecified (issue 18):
a fit reuses the backbone it is given; a kept image comes with its file's SHA-256 (what the
results log and the labels record)."""
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
    run_job(inspect_job(paths, det, CancelToken(), keep_images=True, batch_size=2),
            on_progress=lambda p: items.append(p.item))
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
