"""What an inspection job streams for each image: progress, timing, embeddings on request."""
import pytest

from core import CancelToken, fit_job, run_job
from core.jobs import inspect_job


@pytest.fixture
def fitted(tiny_config, part_images):
    ok, ng = part_images
    return run_job(fit_job(ok, tiny_config, CancelToken())).detector, ok, ng


def _stream(det, paths, **kw):
    progress = []
    run_job(inspect_job(paths, det, CancelToken(), batch_size=3, **kw), on_progress=progress.append)
    return progress


def test_each_image_reports_its_progress_time_and_own_embedding(fitted):
    det, ok, ng = fitted
    paths = ok[:2] + ng  # 5 images: two batches of 3 and 2
    progress = _stream(det, paths, keep_embeddings=True)
    assert [(p.done, p.total) for p in progress] == [(i + 1, 5) for i in range(5)]
    items = [p.item for p in progress]
    assert [i.path for i in items] == paths
    assert all(i.seconds > 0 for i in items)
    for item in items:  # one image's embedding each, and it is that image's
        assert item.embedding.shape[0] == 1
        score = float(det.maps_and_scores(item.embedding.float())[1][0])
        assert score == pytest.approx(item.inspection.score, rel=2e-3)


def test_embeddings_are_kept_only_when_asked(fitted):
    det, ok, ng = fitted
    assert all(p.item.embedding is None for p in _stream(det, ok[:3]))


def test_a_fit_reports_the_backbone_then_every_batch_up_to_all_images(tiny_config, part_images):
    ok, _ = part_images
    progress = []
    run_job(fit_job(ok, tiny_config, CancelToken()), on_progress=progress.append)
    assert (progress[0].done, progress[0].total, progress[0].message) == (0, len(ok), "loading backbone")
    fitting = [p for p in progress if p.message.startswith("fitting: ")]
    assert all(p.total == len(ok) and p.message == f"fitting: {p.done}/{len(ok)} images" for p in fitting)
    done = [p.done for p in fitting]
    assert done == sorted(done) and len(set(done)) == len(done) > 1  # it counts up, batch by batch
