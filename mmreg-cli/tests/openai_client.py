"""`mmreg serve` through the real `openai` Python client (run by tests/openai_client.rs, which starts the
server and passes what `mmreg generate --json` and HF's golden say).

    python openai_client.py BASE_URL EXPECTED.json

Every check asserts; the last line reads "N passed, 0 failed".
"""

import base64
import concurrent.futures
import functools
import http.server
import json
import pathlib
import struct
import sys
import threading
import time
import urllib.request
import zlib

import openai

BASE_URL, EXPECTED = sys.argv[1], json.loads(pathlib.Path(sys.argv[2]).read_text())
REPO = pathlib.Path(EXPECTED["repo"])
IMAGES = REPO / "fixtures/llava-tiny-real/images"
QUESTION = "What is shown in this image?"

client = openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(image_url, question=QUESTION, max_tokens=20, **kwargs):
    return client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True, **kwargs.pop("extra_body", {})},
        **kwargs,
    )


def token_ids(completion):
    return completion.choices[0].model_extra["token_ids"]


def metrics() -> dict:
    text = urllib.request.urlopen(f"{BASE_URL}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_for_metric(name, done, seconds=60):
    """Polls the server's own state (bounded), rather than sleeping a guess."""
    deadline = time.monotonic() + seconds
    while True:
        value = metrics().get(name)
        if value is not None and done(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {name} (last {value})"
        time.sleep(0.02)


IMAGE_A = data_url((IMAGES / "a_300x200.png").read_bytes())
IMAGE_B = data_url((IMAGES / "b_480x640.png").read_bytes())


def test_greedy_equals_generate_and_hf():
    completion = chat(IMAGE_A)
    assert token_ids(completion) == EXPECTED["generate"]["token_ids"], completion
    assert token_ids(completion) == EXPECTED["hf_tokens"], completion
    assert completion.choices[0].message.content == EXPECTED["generate"]["text"]
    assert completion.usage.prompt_tokens == 595
    assert completion.usage.completion_tokens == 20
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_streamed_chunks_join_to_the_same_text():
    stream = chat(IMAGE_A, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == EXPECTED["generate"]["text"], pieces
    assert finish == "length"
    assert usage.completion_tokens == 20


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_an_image_over_loopback_http_equals_its_data_url():
    handler = functools.partial(_Images, directory=str(IMAGES))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/b_480x640.png"
        assert token_ids(chat(url, max_tokens=8)) == token_ids(chat(IMAGE_B, max_tokens=8))
    finally:
        httpd.shutdown()


def expect_400(image_url, words):
    try:
        chat(image_url, max_tokens=2)
    except openai.BadRequestError as error:
        assert error.status_code == 400
        assert words in str(error), error
        return
    raise AssertionError(f"{image_url[:60]}: no 400")


def test_a_disallowed_domain_is_a_400():
    expect_400("https://example.com/cat.png", "not an allowed media domain")


def png_header(width, height):
    """A PNG that claims width x height pixels but holds a few bytes (as mmreg-core/tests/bad_images.rs)."""
    out = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">II", width, height) + bytes([8, 2, 0, 0, 0])
    for kind, data in [(b"IHDR", ihdr), (b"IDAT", bytes([0x78, 0x9C, 0x03, 0x00])), (b"IEND", b"")]:
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return out


def test_a_decompression_bomb_is_a_400():
    expect_400(data_url(png_header(100_000, 100_000)), "over the limit of")


def test_64_concurrent_clients_each_get_their_own_sequential_answer():
    requests = [
        (IMAGE_A if i % 2 == 0 else IMAGE_B, f"{QUESTION} Client {i}.", 3 + i % 6) for i in range(64)
    ]
    alone = [token_ids(chat(image, question, n)) for image, question, n in requests]
    assert len({tuple(ids) for ids in alone}) > 8, "the prompts should give different answers"
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(lambda r: token_ids(chat(*r)), requests))
    assert together == alone


def test_a_client_that_disconnects_frees_its_blocks():
    cancelled = metrics().get("mmreg_engine_requests_cancelled_total", 0)
    stream = chat(IMAGE_A, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    wait_for_metric("mmreg_kv_cache_blocks_used", lambda v: v > 0)
    stream.close()
    wait_for_metric("mmreg_engine_requests_cancelled_total", lambda v: v == cancelled + 1)
    wait_for_metric("mmreg_kv_cache_blocks_used", lambda v: v == 0)


def main():
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_")]
    failed = 0
    for name, test in tests:
        try:
            test()
            print(f"ok      {name}", flush=True)
        except Exception as error:  # report every failure, then fail
            failed += 1
            print(f"FAILED  {name}: {type(error).__name__}: {error}", flush=True)
    print(f"openai {openai.__version__}: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
