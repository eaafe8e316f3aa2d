"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions and Anthropic Messages wire
formats, answering from a script: status codes, Retry-After, garbled bodies, slow replies."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs


@attrs.define
class Reply:
    status: int = 200
    content: str | None = None  # the model's text; None: answer every post "positive"/"joy"
    body: str | None = None  # raw body, overriding the wire format
    headers: dict[str, str] = attrs.Factory(dict)
    delay: float = 0.0


@attrs.define
class Script:
    replies: list[Reply] = attrs.Factory(list)
    requests: list[dict[str, Any]] = attrs.Factory(list)
    # A provider that refuses some texts as such: a request holding this text is answered 400.
    reject_text: str | None = None
    # A text that steers the model into a broken answer: a request holding it gets one result too few.
    garble_text: str | None = None


def _answer(posts: str, content: str | None) -> str:
    if content is not None:
        return content
    n = len([line for line in posts.splitlines() if line.strip()])
    return json.dumps(
        {
            "results": [
                {
                    "i": i,
                    "sentiment": "positive",
                    "sentiment_score": 0.9,
                    "emotion": "joy",
                    "emotion_score": 0.8,
                }
                for i in range(n)
            ]
        }
    )


@contextmanager
def llm_server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return None

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            script.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
            reply = script.replies.pop(0) if script.replies else Reply()
            if script.reject_text and script.reject_text in json.dumps(body["messages"], ensure_ascii=False):
                reply = Reply(status=400, body='{"error": "this content is refused"}')
            if script.garble_text and script.garble_text in json.dumps(body["messages"], ensure_ascii=False):
                reply = Reply(content='{"results": []}')
            time.sleep(reply.delay)
            if reply.body is not None:
                payload = reply.body
            elif self.path.endswith("/messages"):
                text = _answer(body["messages"][0]["content"], reply.content)
                payload = json.dumps({"type": "message", "content": [{"type": "text", "text": text}]})
            else:
                text = _answer(body["messages"][1]["content"], reply.content)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
            data = payload.encode()
            try:
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    finally:
        server.shutdown()
        server.server_close()
