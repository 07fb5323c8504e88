"""Segmenters that must not be called from two threads at once (``thread_safe = False``)."""
import threading

import numpy as np
import pytest
import torch

from gandissect_widgets.engine.protocols import ProtocolError, thread_safe
from tiny import TinySegmenter, run_dissect


class OneCallAtATime:
    """A segmenter with per-call state: a second call while one runs raises.  Each call waits a
    little for a second one, so that two lanes, if they call it at once, are caught doing so."""

    def __init__(self, safe_flag=False):
        self.S = TinySegmenter()
        self.labels = self.S.labels
        self.fingerprint = "one-call-at-a-time"
        self.thread_safe = safe_flag
        self._busy = threading.Lock()
        self._second = threading.Event()

    def __call__(self, x):
        if not self._busy.acquire(blocking=False):
            self._second.set()
            raise RuntimeError("segmenter called from two threads at once")
        try:
            self._second.wait(0.2)
            return self.S(x)
        finally:
            self._busy.release()


@pytest.fixture
def two_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two lanes need two intra-op threads to share out
    yield
    torch.set_num_threads(before)


def test_lanes_call_a_thread_safe_segmenter_at_once(two_cores):
    """The check below can fail: with lanes=2 the segmenter is called from two threads at once."""
    with pytest.raises(RuntimeError, match="two threads at once"):
        run_dissect(S=OneCallAtATime(safe_flag=True), lanes=2)


def test_a_segmenter_marked_not_thread_safe_gets_one_call_at_a_time(two_cores):
    d = run_dissect(S=OneCallAtATime(), lanes=2)
    ref = run_dissect(S=TinySegmenter(), lanes=1)
    np.testing.assert_array_equal(d.iou("layer2"), ref.iou("layer2"))
    np.testing.assert_array_equal(d.thresholds("layer2"), ref.thresholds("layer2"))


def test_thread_safe_flag():
    assert thread_safe(TinySegmenter()) and not thread_safe(OneCallAtATime())
    bad = OneCallAtATime()
    bad.thread_safe = "no"
    with pytest.raises(ProtocolError, match="thread_safe must be True or False, got 'no'"):
        thread_safe(bad)
