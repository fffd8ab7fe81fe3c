#!/usr/bin/env python3
"""A webhook receiver for the routing tests: a real HTTP server in its own process.

It binds 127.0.0.1 on a free port and prints `listening PORT`. Every POST (other
than to /_control) is answered 200 and its events recorded (a JSON array is a batch,
an object one event), unless the receiver is failing: then it answers the failure
status and records nothing. GET /_events returns {"posts", "refused", "events":
[{"contentType", "event"}]}. POST /_control {"failFor": seconds, "status": 503,
"delayMs": n} makes it fail for a while or answer slowly.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"posts": 0, "refused": 0, "events": [], "fail_until": 0.0, "status": 503, "delay": 0.0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/_events":
            self.reply(404)
            return
        with LOCK:
            body = json.dumps(
                {"posts": STATE["posts"], "refused": STATE["refused"], "events": STATE["events"]}
            ).encode()
        self.reply(200, body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path == "/_control":
            control = json.loads(raw or b"{}")
            with LOCK:
                STATE["fail_until"] = time.time() + float(control.get("failFor", 0))
                STATE["status"] = int(control.get("status", 503))
                STATE["delay"] = float(control.get("delayMs", 0)) / 1000.0
            self.reply(204)
            return
        with LOCK:
            failing = time.time() < STATE["fail_until"]
            status = STATE["status"]
            delay = STATE["delay"]
        if delay:
            time.sleep(delay)
        if failing:
            with LOCK:
                STATE["refused"] += 1
            self.reply(status, b'{"error":"failing on purpose"}')
            return
        content_type = self.headers.get("Content-Type", "")
        try:
            payload = json.loads(raw)
        except ValueError:
            self.reply(400)
            return
        events = payload if isinstance(payload, list) else [payload]
        with LOCK:
            STATE["posts"] += 1
            for event in events:
                STATE["events"].append({"contentType": content_type, "event": event})
        self.reply(200)


def main():
    fail_for = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    STATE["fail_until"] = time.time() + fail_for
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
