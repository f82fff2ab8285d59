"""The node's log setup: pydicom's per-decoder tracebacks become DEBUG lines."""

from __future__ import annotations

import logging

import pytest

from dicomnode.cli import DecoderAttemptsAtDebug


def decoder_failure(logger: logging.Logger) -> None:
    try:
        raise ValueError("pyjpegls: cannot decode the frame")
    except ValueError as exc:
        logger.exception(exc)


@pytest.mark.parametrize("root_level, shown", [(logging.INFO, False), (logging.DEBUG, True)])
def test_a_decoder_attempt_is_one_debug_line_without_traceback(
    caplog: pytest.LogCaptureFixture, root_level: int, shown: bool
) -> None:
    logger = logging.getLogger("test.decoders")
    logger.addFilter(DecoderAttemptsAtDebug())
    root = logging.getLogger()
    previous = root.level
    root.setLevel(root_level)
    try:
        with caplog.at_level(root_level):
            decoder_failure(logger)
            logger.warning("a warning without a traceback is left alone")
    finally:
        root.setLevel(previous)
        logger.filters.clear()
    attempts = [r for r in caplog.records if "cannot decode" in r.getMessage()]
    assert [(r.levelname, r.exc_info) for r in attempts] == ([("DEBUG", None)] if shown else [])
    assert any(r.levelname == "WARNING" for r in caplog.records)
