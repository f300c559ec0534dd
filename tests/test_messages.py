"""Messages a user reads when a request or a setting is refused: they say what is wrong in the user's terms."""

import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.errors import rate_limited
from service.settings import Settings


@pytest.mark.parametrize("rate, burst, wait_s, want", [
    (1.0, 1, 0.02, "rate limit reached: 1 request/s, burst 1; retry in 1 s"),
    (2.5, 3, 0.4, "rate limit reached: 2.5 requests/s, burst 3; retry in 1 s"),
    (0.25, 1, 3.2, "rate limit reached: 0.25 requests/s, burst 1; retry in 4 s"),
])
def test_a_rate_limit_says_when_to_retry_as_retry_after_does(rate, burst, wait_s, want):
    e = rate_limited("rate limit reached", rate, burst, wait_s)
    assert e.message == want and e.headers == {"Retry-After": str(math.ceil(wait_s))} and e.status == 429


def test_an_api_keys_file_that_is_not_there_names_the_setting_before_anything_loads(tmp_path):
    with pytest.raises(ValidationError, match=r"api_keys_file\n.*no file /nonexistent/keys"):
        Settings(api_keys_file="/nonexistent/keys")
    bad = tmp_path / "keys"
    bad.write_text("not-a-digest\n")
    with pytest.raises(ValidationError, match=r"keys:1: expected a sha256 hex digest"):
        Settings(api_keys_file=str(bad))
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "1"], capture_output=True, text=True,
                       env={"LORAGEN_API_KEYS_FILE": "/nonexistent/keys", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 2 and "invalid setting api_keys_file" in r.stderr and "no file /nonexistent/keys" in r.stderr
    assert "loaded checkpoint" not in r.stderr  # refused before any model loads
