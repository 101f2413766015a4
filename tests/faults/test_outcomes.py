"""The suite's own yardstick: what counts as completed, a clean error, shed, cut or hung. No engine."""

import pytest

from tests.faults.load import classify

pytestmark = pytest.mark.faults

ERROR = b'{"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "param": null, "code": 500}}'


@pytest.mark.parametrize("status, body, stream, kind", [
    (200, b'data: {"choices": []}\n\ndata: [DONE]\n\n', True, "completed"),
    (200, b'data: {"choices": []}\n\ndata: ' + ERROR + b"\n\ndata: [DONE]\n\n", True, "clean_error"),
    (200, b'data: {"choices": []}\n\n', True, "cut"),
    (200, b'data: {"choices": []}\n\ndata: ' + ERROR + b"\n\n", True, "cut"),
    (200, b'{"choices": [{"text": "x"}]}', False, "completed"),
    (500, ERROR, False, "clean_error"),
    (400, b'{"error": {"message": "bad", "type": "BadRequestError", "param": null, "code": 400}}', False, "clean_error"),
    (503, b"Request dropped due to backpressure (num_queued_requests=16, max_queued_requests=16).", False, "shed"),
    (500, b"Internal Server Error", False, "cut"),
    (200, b'{"detail": "x"}', False, "cut"),
])
def test_responses_should_be_classified_as_a_client_would_judge_them(status, body, stream, kind):
    assert classify(status, body, stream)[0] == kind
