"""A tiled recipe in the station's session: chosen beside the model, fitted, inspected; feedback
is refused clearly until it works on tiles."""
import pytest


@pytest.fixture
def tiled_session(recipe_session):
    return recipe_session


def test_the_tiling_chosen_beside_the_model_is_the_one_fitted_and_inspected(tiled_session, part_images):
    s = tiled_session
    assert [v for _, v in s.tiling_choices()] == [None, "auto", 64, 128]
    s.set_tiling(64)
    assert s.config.tile == 64 and s.config.tile_overlap is None and "64-px tiles" in s.statuses[-1]
    s.set_model("padim-kmeans")
    assert s.config.tile == 64  # another model keeps the tiling
    s.set_model("padim")
    s.start_fit()
    assert not s.errors and s.detector.config.tiled and s.detector.config.tile_overlap == 8
    s.inspect_paths(part_images[1][:1])
    rec = list(s.results)[-1]
    assert rec.anomaly_map.shape == (96, 96)  # the part's own resolution
    assert rec.embedding is None  # no whole-image embedding of a tiled part


def test_labels_are_refused_on_a_tiled_model_and_nothing_is_recorded(tiled_session, part_images):
    s = tiled_session
    s.set_tiling(64)
    s.start_fit()
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    assert "cannot teach a tiled model" in s.errors[-1] and s.labels.rows() == []


def test_operators_cannot_change_the_tiling(tiled_session):
    s = tiled_session
    assert s.set_pin("4711")
    s.lock()
    s.set_tiling("auto")
    assert s.config.tile is None and "Operator mode" in s.errors[-1]


def test_results_of_a_whole_image_model_leave_the_table_when_a_tiled_model_is_fitted(tiled_session, part_images):
    """A tiled model scores an image's tiles, not the whole-image embedding a result keeps:
    the table cannot be re-scored from it, so those results leave it, with a message."""
    s = tiled_session
    s.start_fit()
    s.inspect_paths(part_images[1][:2])
    assert len(s.results) == 2 and list(s.results)[0].embedding is not None
    s.set_tiling(64)
    s.start_fit()
    assert s.detector.config.tiled and len(s.results) == 0 and s.shown is None
    assert any("2 result(s) left the table: the new model embeds images differently" in x for x in s.statuses)


def test_a_tiled_fit_says_labels_are_not_replayed_only_when_there_are_labels(tiled_session, part_images):
    """Found trying the station: a tiled fit of a recipe without labels had its summary
    replaced by "Labels are not replayed on a tiled model"."""
    s = tiled_session
    s.set_tiling(64)
    s.start_fit()
    assert not any("not replayed" in x for x in s.statuses) and s.statuses[-1].startswith("Model fitted")
    s.set_tiling(None)
    s.start_fit()
    s.inspect_paths(part_images[1][:1])
    s.labels.mark_image("image_ng")
    s.set_tiling(64)
    s.start_fit()
    assert any("Labels are not replayed on a tiled model" in x for x in s.statuses)
