"""Hostile HTTP requests, sent as raw bytes over a socket, and what the service must answer to each.

Shared by tests/test_hostile.py (one test per case) and `python -m benchmarks.reliability` (the count it
reports). Two kinds of case:

- reaches the app: a 4xx with the JSON error envelope ({"error": {"type", "message", "request_id"}}) whose
  request id is the response's X-Request-Id;
- malformed HTTP (`protocol=True`): uvicorn's parser refuses it with a plain-text 400 and closes the
  connection before any application code runs, so no envelope is possible there.

Either way: never a 5xx, never a hang, nothing injected into the response headers, and the service answers
the next request normally.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

INJECTED = ("set-cookie", "x-injected")  # headers the injection attempts try to smuggle into a response


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    header_names: list[str] = field(default_factory=list)

    def json(self) -> dict:
        return json.loads(self.body)


def raw_request(port: int, data: bytes, *, timeout_s: float = 20.0, host: str = "127.0.0.1") -> RawResponse:
    """Send `data` as is and read one HTTP/1.1 response (Content-Length, chunked, or up to the close)."""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        try:
            s.sendall(data)
        except OSError:  # the server answered early (413) and stopped reading: read what it said
            pass
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a response head: {buf[:200]!r}")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        names, headers = [], {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            names.append(name.strip().lower())
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(rest) < n:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            body = rest[:n]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = _read_chunked(s, rest)
        else:
            while chunk := s.recv(65536):
                rest += chunk
            body = rest
    return RawResponse(status, headers, body, names)


def _read_chunked(s: socket.socket, buf: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf += s.recv(65536)
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buf) < size + 2:
            buf += s.recv(65536)
        body, buf = body + buf[:size], buf[size + 2 :]
        if size == 0:
            return body


@dataclass(frozen=True)
class Hostile:
    name: str
    group: str
    request: bytes
    status: int  # what the service must answer
    type: str | None  # the envelope's error type; None for malformed HTTP (protocol=True)
    protocol: bool = False
    given_request_id: str | None = None  # an X-Request-Id the service must not echo

    def check(self, r: RawResponse) -> list[str]:
        """What is wrong with `r` as the answer to this case (empty: nothing)."""
        problems = []
        if r.status != self.status:
            problems.append(f"status {r.status}, expected {self.status}: {r.body[:300]!r}")
        for name in INJECTED:
            if name in r.header_names:
                problems.append(f"response carries an injected {name} header")
        if self.protocol:
            return problems
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return [*problems, f"no JSON error envelope: {r.body[:300]!r}"]
        if err.get("type") != self.type:
            problems.append(f"error type {err.get('type')!r}, expected {self.type!r}")
        if not isinstance(err.get("message"), str) or not err["message"]:
            problems.append("envelope without a message")
        rid = r.headers.get("x-request-id")
        if not rid or err.get("request_id") != rid:
            problems.append(f"request id {err.get('request_id')!r} in the body, {rid!r} in X-Request-Id")
        if self.given_request_id is not None and rid == self.given_request_id:
            problems.append("the hostile X-Request-Id was echoed back")
        if b"Traceback" in r.body:
            problems.append("a traceback in the body")
        return problems


def _post(path: str, body: bytes, ctype: str | None = "application/json", extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: loragen\r\n"
    if ctype is not None:
        head += f"Content-Type: {ctype}\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: loragen\r\n" + extra + b"\r\n"


def _chunked(path: str, pieces: list[bytes], size_lines: list[bytes] | None = None) -> bytes:
    out = f"POST {path} HTTP/1.1\r\nHost: loragen\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = out.encode()
    for i, p in enumerate(pieces):
        size = size_lines[i] if size_lines else b"%x" % len(p)
        body += size + b"\r\n" + p + b"\r\n"
    return body + b"0\r\n\r\n"


def _multipart(field_name: str, content: bytes, filename: str | None = "doc.md") -> tuple[bytes, str]:
    disp = f'form-data; name="{field_name}"' + (f'; filename="{filename}"' if filename else "")
    body = (b"--XyZ\r\nContent-Disposition: " + disp.encode() + b"\r\nContent-Type: text/plain\r\n\r\n" + content
            + b"\r\n--XyZ--\r\n")
    return body, "multipart/form-data; boundary=XyZ"


def hostile_cases(*, max_body_bytes: int, emb_dim: int, known_id: str) -> list[Hostile]:
    """Every case, for a service with LORAGEN_MAX_BODY_BYTES=max_body_bytes (over 1 MB, so that a 1 MB text
    reaches the text limit), default LORAGEN_MAX_TEXT_CHARS, a default checkpoint taking embeddings of
    `emb_dim`, and `known_id` an adapter it has cached."""
    big = b'{"task": "' + b"y" * (max_body_bytes + 1024) + b'"}'
    deep = b"[" * 100_000 + b"]" * 100_000
    emb = lambda first, n=emb_dim - 1: b'{"embedding": [' + first + b", 0.5" * n + b"]}"  # noqa: E731
    cases = [
        # ---- bodies over the limit, honest or not about their size
        Hostile("body_over_limit", "size", _post("/generate", big), 413, "payload_too_large"),
        Hostile("content_length_claims_more", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n{\"task\"", 413, "payload_too_large"),
        Hostile("content_length_claims_less", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
                + big, 400, None, protocol=True),
        Hostile("no_content_length", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Type: application/json\r\n\r\n" + big[:4096],
                400, None, protocol=True),
        Hostile("chunked_over_limit", "size", _chunked("/generate", [big[i : i + 65536] for i in range(0, len(big), 65536)]),
                413, "payload_too_large"),
        Hostile("chunked_lying_chunk_size", "size",
                _chunked("/generate", [big], size_lines=[b"7fffffff"])[: -len(b"\r\n0\r\n\r\n")], 413, "payload_too_large"),
        Hostile("content_length_and_chunked", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                400, None, protocol=True),
        Hostile("two_content_lengths", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Length: 5\r\nContent-Length: 16\r\n\r\n{\"task\": \"abc\"}",
                400, None, protocol=True),
        Hostile("content_length_not_a_number", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Length: abc\r\n\r\n", 400, None, protocol=True),
        Hostile("content_length_negative", "size",
                b"POST /generate HTTP/1.1\r\nHost: loragen\r\nContent-Length: -1\r\n\r\n", 400, None, protocol=True),
        # ---- JSON that is deep, odd or not JSON
        Hostile("deeply_nested_json", "json", _post("/generate", b'{"task": ' + deep + b"}"), 422, "invalid_input"),
        Hostile("deeply_nested_json_batch", "json", _post("/v1/adapters/batch", b'{"inputs": ' + deep + b"}"),
                400, "bad_request"),
        Hostile("deeply_nested_multipart_embedding", "json",
                _post("/generate", *_multipart("embedding", deep, filename=None)), 422, "invalid_input"),
        Hostile("json_array_body", "json", _post("/generate", b"[1, 2, 3]"), 422, "invalid_input"),
        Hostile("json_null_body", "json", _post("/generate", b"null"), 422, "invalid_input"),
        Hostile("json_huge_number", "json", _post("/generate", b'{"task": 1e999999}'), 422, "invalid_input"),
        Hostile("empty_body", "json", _post("/generate", b""), 422, "invalid_input"),
        # ---- text encodings
        Hostile("invalid_utf8", "encoding", _post("/generate", b'{"task": "\xff\xfe\xfd"}'), 422, "invalid_input"),
        Hostile("invalid_utf8_batch", "encoding", _post("/v1/adapters/batch", b'{"inputs": [{"task": "\xc3\x28"}]}'),
                400, "bad_request"),
        Hostile("invalid_utf8_upload", "encoding", _post("/generate", *_multipart("document", b"\xff\xfe bad")),
                422, "invalid_input"),
        Hostile("nul_byte_raw", "encoding", _post("/generate", b'{"task": "a\x00b"}'), 422, "invalid_input"),
        Hostile("nul_byte_escaped", "encoding", _post("/generate", b'{"task": "sort\\u0000 a list"}'), 422, "invalid_input"),
        Hostile("nul_byte_in_batch", "encoding", _post("/v1/adapters/batch", b'{"inputs": [{"document": "x\\u0000"}]}'),
                422, "invalid_input"),
        Hostile("nul_byte_upload", "encoding", _post("/generate", *_multipart("document", b"notes\x00more notes")),
                422, "invalid_input"),
        Hostile("lone_surrogate", "encoding", _post("/generate", b'{"task": "abc \\ud800 def"}'), 422, "invalid_input"),
        Hostile("lone_surrogate_batch", "encoding", _post("/v1/adapters/batch", b'{"inputs": [{"task": "\\udfff"}]}'),
                422, "invalid_input"),
        Hostile("lone_surrogate_field_name", "encoding", _post("/generate", b'{"task": "x", "\\ud800": 1}'),
                422, "invalid_input"),
        Hostile("lone_surrogate_checkpoint", "encoding", _post("/generate", b'{"task": "x", "checkpoint": "\\ud800"}'),
                422, "invalid_input"),
        Hostile("one_megabyte_description", "encoding", _post("/generate", b'{"task": "' + b"d" * 1_000_000 + b'"}'),
                422, "invalid_input"),
        Hostile("one_megabyte_document_upload", "encoding", _post("/generate", *_multipart("document", b"d" * 1_000_000)),
                422, "invalid_input"),
        # ---- embeddings
        Hostile("embedding_nan", "embedding", _post("/generate", emb(b"NaN")), 422, "invalid_input"),
        Hostile("embedding_infinity", "embedding", _post("/generate", emb(b"Infinity")), 422, "invalid_input"),
        Hostile("embedding_minus_infinity", "embedding", _post("/generate", emb(b"-Infinity")), 422, "invalid_input"),
        Hostile("embedding_overflow_to_inf", "embedding", _post("/generate", emb(b"1e999")), 422, "invalid_input"),
        Hostile("embedding_too_short", "embedding", _post("/generate", emb(b"0.5", emb_dim - 2)), 422, "invalid_input"),
        Hostile("embedding_too_long", "embedding", _post("/generate", emb(b"0.5", emb_dim)), 422, "invalid_input"),
        Hostile("embedding_empty", "embedding", _post("/generate", b'{"embedding": []}'), 422, "invalid_input"),
        Hostile("embedding_huge", "embedding", _post("/generate", emb(b"0.5", 200_000)), 422, "invalid_input"),
        Hostile("embedding_nested", "embedding", _post("/generate", b'{"embedding": [[0.5, 0.5]]}'), 422, "invalid_input"),
        Hostile("embedding_strings", "embedding", _post("/generate", emb(b'"x"')), 422, "invalid_input"),
        Hostile("embedding_in_batch_nan", "embedding",
                _post("/v1/adapters/batch", b'{"inputs": [' + emb(b"NaN") + b"]}"), 422, "invalid_input"),
        # ---- content types
        Hostile("text_plain", "content-type", _post("/generate", b'{"task": "x"}', "text/plain"), 415,
                "unsupported_media_type"),
        Hostile("form_urlencoded", "content-type", _post("/generate", b"task=x", "application/x-www-form-urlencoded"),
                415, "unsupported_media_type"),
        Hostile("xml", "content-type", _post("/generate", b"<task>x</task>", "application/xml"), 415,
                "unsupported_media_type"),
        Hostile("text_plain_batch", "content-type", _post("/v1/adapters/batch", b'{"inputs": [{"task": "x"}]}', "text/plain"),
                415, "unsupported_media_type"),
        Hostile("multipart_without_boundary", "content-type", _post("/generate", b"--x\r\n", "multipart/form-data"),
                422, "invalid_input"),
        Hostile("multipart_garbage", "content-type",
                _post("/generate", b"\x00\x01garbage", "multipart/form-data; boundary=XyZ"), 422, "invalid_input"),
        # ---- adapter ids and names that try to leave their place
        Hostile("id_dot_dot", "path", _get(b"/v1/adapters/../../etc/passwd"), 404, "not_found"),
        Hostile("id_encoded_dot_dot", "path", _get(b"/v1/adapters/%2e%2e%2f%2e%2e%2fetc%2fpasswd"), 404, "not_found"),
        Hostile("id_encoded_dot_dot_alone", "path", _get(b"/v1/adapters/%2e%2e"), 404, "not_found"),
        Hostile("id_absolute_path", "path", _get(b"/v1/adapters//etc/passwd"), 404, "not_found"),
        Hostile("id_encoded_absolute_path", "path", _get(b"/v1/adapters/%2fetc%2fpasswd"), 404, "not_found"),
        Hostile("id_backslashes", "path", _get(b"/v1/adapters/..%5c..%5cwindows"), 404, "not_found"),
        Hostile("id_nul", "path", _get(b"/v1/adapters/" + known_id[:32].encode() + b"%00" + known_id[33:].encode()),
                404, "not_found"),
        Hostile("id_not_hex", "path", _get(b"/v1/adapters/" + b"g" * 64), 404, "not_found"),
        Hostile("id_upper_hex", "path", _get(b"/v1/adapters/" + known_id.upper().encode()), 404, "not_found"),
        Hostile("id_too_short", "path", _get(b"/v1/adapters/" + known_id[:-1].encode()), 404, "not_found"),
        Hostile("id_too_long", "path", _get(b"/v1/adapters/" + known_id.encode() + b"0"), 404, "not_found"),
        Hostile("id_redis_glob", "path", _get(b"/v1/adapters/*"), 404, "not_found"),
        Hostile("format_traversal", "path", _get(b"/v1/adapters/" + known_id.encode() + b"?format=../../etc/passwd"),
                422, "invalid_input"),
        Hostile("checkpoint_traversal", "path", _post("/generate", b'{"task": "x", "checkpoint": "../../etc/passwd"}'),
                422, "invalid_input"),
        Hostile("checkpoint_absolute_path", "path", _post("/generate", b'{"task": "x", "checkpoint": "/etc"}'),
                422, "invalid_input"),
        Hostile("checkpoint_hf_source", "path", _post("/generate", b'{"task": "x", "checkpoint": "hf://evil/repo"}'),
                422, "invalid_input"),
        # ---- header injection
        Hostile("header_cr_injection", "header", _get(b"/health", b"X-Request-Id: abc\rSet-Cookie: pwn=1\r\n"),
                400, None, protocol=True),
        Hostile("header_lf_injection", "header", _get(b"/health", b"X-Request-Id: abc\nSet-Cookie: pwn=1\r\n"),
                400, None, protocol=True),
        Hostile("header_nul", "header", _get(b"/health", b"X-Request-Id: abc\x00def\r\n"), 400, None, protocol=True),
        Hostile("request_id_markup", "header", _get(b"/v1/adapters/nope", b"X-Request-Id: <script>alert(1)</script>\r\n"),
                404, "not_found", given_request_id="<script>alert(1)</script>"),
        Hostile("request_id_too_long", "header", _get(b"/v1/adapters/nope", b"X-Request-Id: " + b"a" * 300 + b"\r\n"),
                404, "not_found", given_request_id="a" * 300),
        Hostile("request_id_non_ascii", "header", _get(b"/v1/adapters/nope", "X-Request-Id: abc\u00e9\r\n".encode("latin-1")),
                404, "not_found", given_request_id="abc\u00e9"),
        Hostile("crlf_in_reflected_value", "header",
                _post("/generate", b'{"task": "x", "checkpoint": "a\\r\\nSet-Cookie: pwn=1\\r\\nX-Injected: 1"}'),
                422, "invalid_input"),
        Hostile("crlf_in_path", "header", _get(b"/v1/adapters/x%0d%0aSet-Cookie:%20pwn=1"), 404, "not_found"),
    ]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("hostile case names must be unique")
    return cases


def is_whole_safetensors(body: bytes) -> bool:
    """A served adapter is a whole safetensors file: header length, JSON header, then exactly its data."""
    if len(body) < 8:
        return False
    n = int.from_bytes(body[:8], "little")
    try:
        header = json.loads(body[8 : 8 + n])
    except ValueError:
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end == len(body)

