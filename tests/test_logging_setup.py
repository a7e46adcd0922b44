"""Issue 19: the run's logging touches only the handlers it made and DeepSpeed's own, so a test session's
capture handlers (pytest's) stay, and DeepSpeed's lines go where the run's go (the current stderr)."""
import io
import logging

from moca_fast.train.run_log import LOG_HANDLER, setup_logging


def test_deepspeed_log_lines_go_to_the_current_stderr_and_foreign_handlers_stay(capfd):
    """DeepSpeed's own handler writes to the sys.stdout of its import (in a test session, an earlier test's
    capture); the run's logging replaces it, and leaves every other handler (pytest's among them) alone."""
    deepspeed_log = logging.getLogger("DeepSpeed")
    stale, foreign = logging.StreamHandler(io.StringIO()), type("ForeignHandler", (logging.StreamHandler,), {})()
    deepspeed_log.addHandler(stale)
    deepspeed_log.addHandler(foreign)
    try:
        setup_logging(True)
        assert stale not in deepspeed_log.handlers and foreign in deepspeed_log.handlers
        deepspeed_log.warning("a DeepSpeed warning")
        assert "DeepSpeed: a DeepSpeed warning" in capfd.readouterr().err and not stale.stream.getvalue()
    finally:
        for handler in (stale, foreign):
            deepspeed_log.removeHandler(handler)


def test_setup_logging_replaces_only_its_own_root_handler(capfd):
    root = logging.getLogger()
    foreign = logging.StreamHandler(io.StringIO())
    root.addHandler(foreign)
    try:
        setup_logging(True)
        setup_logging(True)
        ours = [h for h in root.handlers if h.get_name() == LOG_HANDLER]
        assert len(ours) == 1 and foreign in root.handlers
        logging.getLogger("moca_fast.train").info("one line")
        assert capfd.readouterr().err.count("moca_fast.train: one line") == 1
    finally:
        root.removeHandler(foreign)


def test_the_run_log_follows_stderr_when_it_is_replaced(monkeypatch):
    """A handler keeping the stderr of its creation writes to a closed stream once that stderr is replaced (as
    after a test's capture: every later log line was a 'Logging error' traceback)."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging(True)
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("moca_fast.train").warning("after the swap")
    assert "moca_fast.train: after the swap" in second.getvalue() and "Logging error" not in second.getvalue()
