"""launcher/signals.py: before the training loop a stop signal ends the process at once (start-up,
data preparation: nothing to save); inside it the signal is only recorded, for the ranks to
agree on at the next step boundary, and a second one does not interrupt the save."""
import os
import signal

import pytest

from strata.launcher.signals import Preempted, StopRequest


@pytest.fixture
def stop():
    request = StopRequest("SIGUSR1")
    request.install()
    yield request
    request.restore()


def test_before_the_loop_a_signal_stops_at_once(stop):
    with pytest.raises(Preempted, match="stopped by SIGTERM before training started: nothing to save"):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # a point where Python runs the handler


def test_inside_the_loop_signals_are_recorded_not_raised(stop):
    with stop.deferred():
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGINT)  # a second one, say during the save
        signal.sigtimedwait([], 0)
        assert stop.requested and stop.signal == "SIGUSR1"


def test_restore_gives_the_signals_back():
    before = signal.getsignal(signal.SIGTERM)
    request = StopRequest("")
    request.install()
    assert signal.getsignal(signal.SIGTERM) == request._handle
    assert signal.getsignal(signal.SIGUSR1) != request._handle, "'' leaves SIGUSR1 alone"
    request.restore()
    assert signal.getsignal(signal.SIGTERM) == before
