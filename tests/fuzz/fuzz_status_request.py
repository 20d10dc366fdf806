"""libFuzzer (atheris) harness for the status socket's request parser,
agent/control/server.py: parse_request must answer any input with a
request, "incomplete" (None) or a StatusError with a short message, of
status 400, 417 (an Expect it cannot meet) or 501 (a transfer coding other
than chunked); any other exception, or a request that breaks the
invariants below, is a crash.

    make fuzz                                  (runs it for FUZZ_SECONDS)
    .venv/bin/python tests/fuzz/fuzz_status_request.py -max_total_time=60 \\
        -dict=tests/fuzz/fuzz_status_request.dict tests/fuzz/corpus/fuzz_status_request

The seeds are in tests/fuzz/corpus/fuzz_status_request/ (each file's name
says what it is); tests/unit/control/test_status_fuzz_corpus.py runs them
all through check() in the ordinary test suite.
"""

from __future__ import annotations

import sys

MAX_MESSAGE = 120   # an error's text stays short, whatever the input quoted
PARSE_ERRORS = (400, 417, 501)


def check(data: bytes) -> None:
    from agent.control.server import MAX_REQUEST, StatusError, error_response, parse_request

    try:
        parsed = parse_request(data)
    except StatusError as error:
        if error.status not in PARSE_ERRORS or not error.message or len(error.message) > MAX_MESSAGE:
            raise AssertionError(f"bad error {error.status} {error.message!r}") from None
        # The answer can be written: its body is JSON of bounded size.
        assert len(error_response(error.status, error.message).body) < 2 * MAX_MESSAGE + 20
        return
    if parsed is None:
        return
    request, used = parsed
    assert 0 < used <= len(data)
    assert used - (len(data) - len(data.lstrip(b"\r\n"))) <= MAX_REQUEST
    assert request.path.startswith("/") and "?" not in request.path and "#" not in request.path
    assert request.method and request.version in ("HTTP/1.0", "HTTP/1.1")
    assert all(isinstance(v, list) and v for v in request.query.values())
    request.keep_alive  # noqa: B018  (a property: must not raise)


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    with atheris.instrument_imports():
        import agent.control.server  # noqa: F401

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
