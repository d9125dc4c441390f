"""The inline executor: a session's jobs run to their end in the caller's thread."""
import pytest

from core.jobs import InlineExecutor, JobCallbacks, Progress


def test_progress_items_and_the_result_reach_their_callbacks_in_order():
    seen = []

    def job(token):
        yield Progress(0, 2, "first")
        yield Progress(1, 2, "second", item="scored")
        yield "raw item"
        return 42

    ex = InlineExecutor()
    ex.submit(job, JobCallbacks(on_progress=lambda p: seen.append(("progress", p.done, p.total, p.message)),
                                on_item=lambda i: seen.append(("item", i)),
                                on_returned=lambda v: seen.append(("returned", v, ex.busy))))
    assert seen == [("progress", 0, 2, "first"), ("progress", 1, 2, "second"), ("item", "scored"),
                    ("item", "raw item"), ("returned", 42, True)]  # busy while the job's callbacks run
    assert ex.busy is False


@pytest.mark.parametrize("ending", ["fails", "cancelled"])
def test_the_executor_is_free_again_after_a_failure_or_a_cancel(ending):
    from core.jobs import Cancelled

    ended = []

    def job(token):
        yield Progress(0, 1, "working")
        raise (RuntimeError("broken") if ending == "fails" else Cancelled())

    ex = InlineExecutor()
    ex.submit(job, JobCallbacks(on_failed=lambda e: ended.append(str(e)), on_cancelled=lambda: ended.append("cancel")))
    assert ended == (["broken"] if ending == "fails" else ["cancel"])
    assert ex.busy is False
