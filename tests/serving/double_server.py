"""A test double of `optimize serve` for the load generator's tests and benchmarks/serving.py.

The double (the standard library's threaded HTTP server: one thread per connection, nothing between the socket
and the clock): infer answers exactly --service-ms after its request line arrived; --serial serves one request
at a time (capacity 1000 / service-ms rps); the
--stall-at'th request stalls every request for --stall-s; every --shed-every'th is a 503, every --hang-every'th
is answered after 2 s. It counts what it answers in the metrics the real server exposes.
"""

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

p = argparse.ArgumentParser()
p.add_argument("--service-ms", type=float, default=10.0)
p.add_argument("--serial", action="store_true")
p.add_argument("--stall-at", type=int, default=0)
p.add_argument("--stall-s", type=float, default=1.0)
p.add_argument("--shed-every", type=int, default=0)
p.add_argument("--hang-every", type=int, default=0)
p.add_argument("--ready-file", required=True)
args = p.parse_args()

registry = CollectorRegistry()
by_code = Counter("optimize_requests", "answered", ["code"], registry=registry)
queue_time = Histogram("optimize_queue_time_seconds", "queued", registry=registry)
batch_size = Histogram("optimize_batch_size", "rows", buckets=(1, 2, 4, 8), registry=registry)
Gauge("optimize_queue_depth", "waiting", registry=registry)
Gauge("optimize_model_info", "model", ["name", "model_version"], registry=registry).labels("double", "1").set(1)
METADATA = {
    "name": "double",
    "versions": ["1"],
    "platform": "test",
    "outputs": [],
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
}
OK_BODY = b'{"model_name": "double", "outputs": []}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)
serial = threading.Lock()
state = {"n": 0, "stall_until": 0.0, "free_at": 0.0}
state_lock = threading.Lock()


def sleep_until(t):  # time.sleep wakes ~0.1-0.3 ms late on this VM: the last 0.5 ms is polled
    if t - time.perf_counter() > 0.0005:
        time.sleep(t - time.perf_counter() - 0.0005)
    while time.perf_counter() < t:
        time.sleep(0)


def work(n, arrived):  # done --service-ms after arrival, after the stall, or (--serial) after the one before
    if args.stall_at and n == args.stall_at:
        state["stall_until"] = time.perf_counter() + args.stall_s
    begin = max(arrived, state["stall_until"])
    if args.hang_every and n % args.hang_every == 0:
        begin += 2.0
    with serial if args.serial else threading.Lock():
        if args.serial:
            begin = max(begin, state["free_at"])
            state["free_at"] = begin + args.service_ms / 1000
        queue_time.observe(max(0.0, begin - arrived))
        sleep_until(begin + args.service_ms / 1000)
        batch_size.observe(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait for a delayed ACK

    def log_message(self, *a):
        pass

    def parse_request(self):  # called as the request line has arrived
        self.arrived = time.perf_counter()
        return super().parse_request()

    def answer(self, code, body, content_type="application/json", headers=()):
        by_code.labels(str(code)).inc() if self.command == "POST" else None
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/metrics":
            self.answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
        elif self.path == "/v2/models/double":
            self.answer(200, json.dumps(METADATA).encode())
        else:
            self.answer(404, b'{"error": "not found"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        size = int(self.headers["Inference-Header-Content-Length"])
        x = json.loads(body[:size])["inputs"][0]
        if (
            self.path != "/v2/models/double/infer"
            or x["name"] != "x"
            or x["datatype"] != "FP32"
            or (len(body) - size != 4 * x["shape"][0] * x["shape"][1])
        ):
            return self.answer(400, b'{"error": "bad request"}')
        with state_lock:
            state["n"] += 1
            n = state["n"]
        if args.shed_every and n % args.shed_every == 0:
            return self.answer(503, b'{"error": "busy"}', headers=[("Retry-After", "1")])
        work(n, self.arrived)
        by_code.labels("200").inc()
        self.wfile.write(OK)  # one write, made beforehand: the answer leaves as the service time ends


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
with open(args.ready_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.replace(args.ready_file + ".tmp", args.ready_file)
server.serve_forever()
