"""A stand-in for llama.cpp's ``llama-server`` where the real one is not needed: the process behaviour.

Run as a program (``llama_server_stand_in`` writes an executable that runs it, for
``FINE_TUNER_LLAMA_SERVER``). Like llama-server it takes ``--host``/``--port`` (the other options are
accepted and ignored), listens at once, exits 1 with llama-server's line when the port is taken,
answers ``GET /health`` 503 while it "loads" (``FAKE_LLAMA_LOAD_S`` seconds, ``never``: for ever)
and 200 afterwards, and exits 0 on SIGTERM. It writes its pid to ``FAKE_LLAMA_PID_FILE`` once it
listens. ``FAKE_LLAMA_LISTENER=other``: a process of its own (a forked child) listens and answers
instead, while the server itself only waits: what a program that took the port first looks like.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def llama_server_stand_in(folder: Path) -> Path:
    """An executable ``llama-server`` in ``folder`` that runs this stand-in (same pid: exec)."""
    path = folder / "llama-server"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} \"$@\"\n")
    path.chmod(0o700)
    return path


def _option(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def main(args: list[str]) -> int:
    host, port = _option(args, "--host", "127.0.0.1"), int(_option(args, "--port", "8080"))
    load_s = os.environ.get("FAKE_LLAMA_LOAD_S", "0")
    ready_at = float("inf") if load_s == "never" else time.monotonic() + float(load_s)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            loaded = time.monotonic() >= ready_at
            body = json.dumps({"status": "ok"} if loaded else {"error": {"message": "Loading model"}}).encode()
            self.send_response(200 if loaded else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    if os.environ.get("FAKE_LLAMA_LISTENER") == "other":
        listener = os.fork()
        if listener:
            signal.signal(signal.SIGTERM, lambda *_: (os.kill(listener, signal.SIGKILL), os._exit(0)))
            os.waitpid(listener, 0)
            return 0
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError:
        print(f"couldn't bind HTTP server socket, hostname: {host}, port: {port}", file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.environ.get("FAKE_LLAMA_PID_FILE"):
        Path(os.environ["FAKE_LLAMA_PID_FILE"]).write_text(str(os.getpid()))
    print(f"main: server is listening on http://{host}:{port} - starting the main loop", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
