#!/usr/bin/env python3
"""A webhook receiver for the routing tests: a real HTTP server in its own process.

It binds 127.0.0.1 on a free port and prints `listening PORT`. Every POST (other
than to /_control) is answered 200 and its events recorded (a JSON array is a batch,
an object one event), unless the receiver is failing: then it answers the failure
status and records nothing. GET /_events returns {"posts", "refused", "events":
[{"contentType", "event"}]}. POST /_control {"failFor": seconds, "status": 503,
"delayMs": n} makes it fail for a while or answer slowly.

With `--stats` (benchmarks) it keeps no events, only each event's latency (arrival
minus the CloudEvents `time`, the hub's enqueue time; same machine, same clock):
GET /_stats returns {"count", "p50_ms", "p99_ms", "max_ms"}; POST /_reset clears.
"""

import calendar
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"posts": 0, "refused": 0, "events": [], "fail_until": 0.0, "status": 503, "delay": 0.0,
         "stats": False, "latencies": []}


def epoch(rfc3339):
    """Seconds since the epoch of `2026-12-05T02:00:00.123456789Z` (any fraction)."""
    main, _, rest = rfc3339.partition(".")
    fraction = "".join(c for c in rest if c.isdigit()) if rest else ""
    base = calendar.timegm(time.strptime(main.rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
    return base + (float("0." + fraction) if fraction else 0.0)


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


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
        if self.path == "/_stats":
            with LOCK:
                values = list(STATE["latencies"])
                posts = STATE["posts"]
            body = {"count": len(values), "posts": posts,
                    "p50_ms": percentile(values, 0.50), "p99_ms": percentile(values, 0.99),
                    "max_ms": max(values) if values else None}
            self.reply(200, json.dumps(body).encode())
            return
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
        if self.path == "/_reset":
            with LOCK:
                STATE["latencies"] = []
                STATE["events"] = []
                STATE["posts"] = 0
            self.reply(204)
            return
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
        if STATE["stats"]:
            now = time.time()
            latencies = [(now - epoch(e.get("time", ""))) * 1000.0 for e in events]
            with LOCK:
                STATE["posts"] += 1
                STATE["latencies"].extend(latencies)
            self.reply(200)
            return
        with LOCK:
            STATE["posts"] += 1
            for event in events:
                STATE["events"].append({"contentType": content_type, "event": event})
        self.reply(200)


def main():
    args = sys.argv[1:]
    if "--stats" in args:
        STATE["stats"] = True
        args.remove("--stats")
    fail_for = float(args[0]) if args else 0.0
    STATE["fail_until"] = time.time() + fail_for
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
