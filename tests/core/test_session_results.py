"""The session's results: verdicts, ids, what is kept and how a result is named."""
import numpy as np

from core.session_results import KEEP_IMAGES, MAX_RESULTS, SessionResults, display_name, judge, thumbnail

MAP = np.zeros((8, 8), np.float32)


def _add(results, score=1.0, image=None, path="p.png", threshold=2.0, **kw):
    return results.add("p.png", score, MAP, image, path, 0.01, threshold, **kw)


def test_a_verdict_needs_a_threshold_and_is_ng_only_strictly_above_it():
    assert judge(5.0, None) == "?"  # no threshold: never counted as OK
    assert judge(2.0, 2.0) == "OK" and judge(2.0001, 2.0) == "NG"


def test_thumbnails_are_about_48_pixels_on_the_short_side_whatever_the_channels():
    assert thumbnail(np.zeros((300, 300, 3), np.uint8)).shape == (50, 50, 3)  # every 6th pixel
    assert thumbnail(np.zeros((96, 200, 3), np.uint8)).shape == (48, 100, 3)  # every 2nd
    assert thumbnail(np.zeros((30, 40, 3), np.uint8)).shape == (30, 40, 3)  # small: as it is


def test_a_result_keeps_its_image_thumbnail_hash_and_verdict():
    res = SessionResults()
    img = np.full((96, 96, 3), 7, np.uint8)
    rec = _add(res, score=3.0, image=img, sha256="ab" * 32)
    assert rec.image is img and rec.thumbnail.shape == (48, 48, 3) and rec.verdict == "NG"
    assert rec.sha256 == "ab" * 32 and res.get(rec.id) is rec and res.get(None) is None
    bare = _add(res, image=None)
    assert bare.thumbnail is None and bare.sha256 == "" and bare.verdict == "OK"


def test_ids_grow_in_arrival_order_and_the_oldest_results_drop_out_first():
    res = SessionResults()
    recs = [_add(res, score=float(i)) for i in range(MAX_RESULTS)]
    ids = [r.id for r in recs]
    assert ids == sorted(ids) and len(set(ids)) == MAX_RESULTS
    assert len(res) == MAX_RESULTS and recs[0].id in res  # exactly MAX_RESULTS are kept
    newest = _add(res)
    assert len(res) == MAX_RESULTS and recs[0].id not in res and recs[1].id in res and newest.id in res
    assert [r.id for r in res] == ids[1:] + [newest.id]
    assert res.dropped == 1  # counted, so the operator is told the table is not the whole run
    _add(res)
    assert res.dropped == 2
    res.clear()
    assert res.dropped == 0 and len(res) == 0


def test_a_finished_run_says_how_many_were_inspected_and_when_the_table_shows_only_the_newest():
    """Found trying the station: 641 inspected said "Done: 500 results", and one more image
    "Done: 500 results" again."""
    from core.session import InspectionSession

    s = InspectionSession.__new__(InspectionSession)  # only the results matter to the message
    s.results = SessionResults()
    for _ in range(3):
        _add(s.results)
    assert s._done_message(3) == "Done: 3 inspected"
    for _ in range(MAX_RESULTS + 138):
        _add(s.results)
    assert s._done_message(641) == (f"Done: 641 inspected; the results table keeps the newest {MAX_RESULTS} "
                                     "(141 older ones are in the results log and the shift counts)")


def test_older_file_results_let_their_images_go_but_live_frames_keep_theirs():
    res = SessionResults()
    img = np.zeros((16, 16, 3), np.uint8)
    first_file = _add(res, image=img, path="a.png")
    first_live = _add(res, image=img, path=None)
    for _ in range(KEEP_IMAGES):
        _add(res, image=img, path="b.png")
    assert first_file.image is None and first_live.image is img  # a file can be read again


def test_rejudging_follows_the_threshold_and_no_threshold_gives_question_marks():
    res = SessionResults()
    low, high = _add(res, score=1.0), _add(res, score=3.0)
    res.rejudge(0.5)
    assert (low.verdict, high.verdict) == ("NG", "NG")
    res.rejudge(None)
    assert (low.verdict, high.verdict) == ("?", "?")


def test_a_result_is_named_by_its_file_name_or_as_given_and_shows_known_truth():
    assert display_name("/data/run 1/cell_7.png", True, {}) == "cell_7.png"
    assert display_name("camera 0 frame 12", False, {}) == "camera 0 frame 12"
    assert display_name("/videos/line 3.mp4 frame 12", False, {}) == "/videos/line 3.mp4 frame 12"  # as given
    truth = {"/data/cell_7.png": "NG"}
    assert display_name("/data/cell_7.png", True, truth) == "cell_7.png  [truth NG]"


def test_large_maps_are_kept_reduced_by_block_maximum_and_small_ones_as_they_are():
    from core.session_results import MAX_MAP_SIDE, display_map

    big = np.zeros((2 * MAX_MAP_SIDE + 3, 3 * MAX_MAP_SIDE), np.float32)
    big[1001, 2999] = 9.0  # one hot pixel: still there after the reduction
    small = display_map(big)
    assert max(small.shape) <= MAX_MAP_SIDE and small.max() == 9.0
    assert small.shape == (-(-big.shape[0] // 3), MAX_MAP_SIDE)  # a partial last block row is kept
    assert np.unravel_index(small.argmax(), small.shape) == (333, 999)
    big[2050, 5] = 7.0  # a hot spot on the very edge, in the partial block row
    assert display_map(big)[-1, 1] == 7.0
    assert display_map(MAP) is MAP
    rec = SessionResults().add("big", 9.0, big, None, "big.png", 0.1, 1.0)
    assert rec.anomaly_map.shape == small.shape and rec.score == 9.0  # the score is the full map's


def test_decoded_images_are_kept_within_a_byte_budget_the_newest_always(monkeypatch):
    import core.session_results as sr

    monkeypatch.setattr(sr, "KEEP_IMAGE_BYTES", 3 * 96 * 96 * 3)
    res = SessionResults()
    recs = [_add(res, image=np.zeros((96, 96, 3), np.uint8), path=f"{i}.png") for i in range(5)]
    assert [r.image is not None for r in recs] == [False, False, True, True, True]
    huge = _add(res, image=np.zeros((400, 400, 3), np.uint8), path="huge.png")
    assert huge.image is not None and all(r.image is None for r in recs)


def test_live_frames_keep_their_images_within_the_byte_budget_too(monkeypatch):
    """A live frame cannot be read again, so the count limit spares it; the byte budget does
    not (a tiled model's 12 MP frames would hold gigabytes)."""
    import core.session_results as sr

    monkeypatch.setattr(sr, "KEEP_IMAGE_BYTES", 3 * 96 * 96 * 3)
    monkeypatch.setattr(sr, "KEEP_IMAGES", 2)
    res = SessionResults()
    recs = [_add(res, image=np.zeros((96, 96, 3), np.uint8), path=None) for i in range(5)]
    assert [r.image is not None for r in recs] == [False, False, True, True, True]


def test_exactly_the_newest_keep_images_file_images_are_kept():
    res = SessionResults()
    img = np.zeros((8, 8, 3), np.uint8)
    recs = [_add(res, image=img, path=f"{i}.png") for i in range(KEEP_IMAGES + 1)]
    assert [r.image is not None for r in recs] == [False] + [True] * KEEP_IMAGES


def test_a_reduced_map_is_read_only_and_of_the_maps_own_type():
    from core.session_results import MAX_MAP_SIDE, display_map

    big = np.ones((2 * MAX_MAP_SIDE, 2 * MAX_MAP_SIDE), np.float32)
    small = display_map(big)
    assert small.dtype == np.float32 and not small.flags.writeable  # shared with the view as it is
