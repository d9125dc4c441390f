"""The patch features and the image score of the next fit, chosen beside the model in the
station's session (README, "Which model": the settings for varied good parts)."""
import pytest


@pytest.fixture
def session(recipe_session):
    return recipe_session


def test_averaged_features_chosen_for_padim_are_the_ones_fitted(session):
    s = session
    assert [n for _, n in s.feature_choices()] == [1, 3] and s.neighbourhood() == 1
    s.set_neighbourhood(3)
    assert s.config.model_params == {"neighbourhood": 3} and s.statuses[-1] == (
        "Next fit: patches averaged 3 × 3 (press F5 to fit)")
    s.start_fit()
    assert not s.errors and s.detector.model.neighbourhood == 3


def test_each_model_shows_its_own_features_setting_or_none(session):
    s = session
    s.set_model("patchcore")
    assert s.neighbourhood() == 3  # PatchCore's own default: locally aware features
    s.set_model("padim-kmeans")
    assert s.neighbourhood() == 1  # the mixture's own default: each patch on its own
    s.set_model("favae")
    assert s.feature_choices() is None and s.neighbourhood() is None
    s.set_neighbourhood(3)  # nothing to set: nothing changes
    assert "neighbourhood" not in s.config.model_params


def test_the_top_k_score_offered_is_about_two_percent_of_the_map(session):
    s = session  # the tiny recipe inspects at 64 px
    choices = dict((v[0], v) for _, v in s.pooling_choices())
    assert choices["topk"] == ("topk", 82) and choices["max"][0] == "max" and choices["blob"][0] == "blob"
    s.set_pooling(choices["topk"])
    assert (s.config.pooling, s.config.topk) == ("topk", 82)
    assert s.statuses[-1] == "Next fit scores images by the mean of the hottest 82 pixels (press F5 to fit)"
    s.start_fit()
    assert not s.errors and s.detector.post.pooling == "topk" and s.detector.post.topk == 82


def test_operators_cannot_change_features_or_score(session):
    s = session
    assert s.set_pin("4711")
    s.lock()
    s.set_neighbourhood(3)
    assert s.neighbourhood() == 1 and "Operator mode" in s.errors[-1]
    s.set_pooling(("blob", 100))
    assert s.config.pooling == "max" and "Operator mode" in s.errors[-1]


def test_the_grey_level_rule_chosen_is_the_one_fitted_and_said_in_words(session):
    s = session
    assert [c for _, c in s.contrast_choices()] == [None, "stretch", "flatten"] and s.config.contrast is None
    s.set_contrast("flatten")
    assert s.config.contrast == "flatten" and s.statuses[-1] == (
        "Next fit: each image's shading flattened, grey levels stretched (press F5 to fit)")
    s.start_fit()
    assert not s.errors and s.detector.config.contrast == "flatten"
    s.set_contrast(None)
    assert s.config.contrast is None and s.statuses[-1].startswith("Next fit: grey levels as recorded")


def test_a_grey_level_rule_with_tiles_is_refused_and_the_recipe_kept(session):
    s = session
    s.set_tiling(64)
    s.set_contrast("flatten")
    assert s.config.contrast is None and s.config.tile == 64
    assert "Cannot use the grey levels" in s.errors[-1] and "flatten works on whole images" in s.errors[-1]
