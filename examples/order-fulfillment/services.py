#!/usr/bin/env python3
"""Three small services for the order-fulfillment saga: inventory, payment and shipping.

Standard library only. Each service remembers the answer it gave to every Idempotency-Key,
so a step that Skald retries (after a timeout or a crash) never reserves, charges or ships
twice. Payment declines (402) any order whose total is over 1000: that is how you watch a
saga compensate.

    python3 services.py            # inventory on 8081, payment on 8082, shipping on 8083
    python3 services.py --base-port 9081
"""

import argparse
import itertools
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
COUNTER = itertools.count(1)


def log(service, message):
    with LOCK:
        print(f"[{service:9}] {message}", flush=True)


class Service(BaseHTTPRequestHandler):
    name = "service"
    answers = {}  # Idempotency-Key -> (status, body), per service class

    def log_message(self, *args):  # quiet the default access log
        pass

    def do_POST(self):
        self.handle_call()

    def do_DELETE(self):
        self.handle_call()

    def handle_call(self):
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        key = self.headers.get("idempotency-key", "")
        with LOCK:
            remembered = self.answers.get(key)
        if remembered:
            status, answer = remembered
            log(self.name, f"{self.command} {self.path} again (key {key}): same answer {status}")
        else:
            status, answer = self.decide(self.command, self.path, body)
            with LOCK:
                self.answers[key] = (status, answer)
            log(self.name, f"{self.command} {self.path} {json.dumps(body)} -> {status} {json.dumps(answer)}")
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Inventory(Service):
    name = "inventory"
    answers = {}

    def decide(self, method, path, body):
        if method == "POST" and path == "/reservations":
            return 201, {"reservationId": f"R-{next(COUNTER)}", "items": body.get("items")}
        if method == "DELETE" and path.startswith("/reservations/"):
            return 200, {"released": path.rsplit("/", 1)[-1]}
        return 404, {"error": f"no route {method} {path}"}


class Payment(Service):
    name = "payment"
    answers = {}

    def decide(self, method, path, body):
        if method == "POST" and path == "/payments":
            if float(body.get("amount", 0)) > 1000:
                return 402, {"error": "card declined: over the limit"}
            return 201, {"paymentId": f"P-{next(COUNTER)}", "amount": body.get("amount")}
        if method == "POST" and path.startswith("/payments/") and path.endswith("/refund"):
            return 200, {"refunded": path.split("/")[2]}
        return 404, {"error": f"no route {method} {path}"}


class Shipping(Service):
    name = "shipping"
    answers = {}

    def decide(self, method, path, body):
        if method == "POST" and path == "/shipments":
            return 201, {"trackingNumber": f"TRACK-{next(COUNTER)}", "order": body.get("order")}
        return 404, {"error": f"no route {method} {path}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-port", type=int, default=8081)
    args = parser.parse_args()
    servers = []
    for offset, handler in enumerate([Inventory, Payment, Shipping]):
        port = args.base_port + offset
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        log(handler.name, f"listening on http://127.0.0.1:{port}")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        for server in servers:
            server.shutdown()
        sys.exit(0)


if __name__ == "__main__":
    main()
