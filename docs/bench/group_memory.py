"""Resident memory of a Skald server as idle consumer groups fill over large events (docs/benchmarks.md).

usage: group_memory.py SKALD_BINARY EVENTS EVENT_BYTES GROUPS
Starts the server on a fresh data dir and a free port, appends EVENTS events whose data holds
EVENT_BYTES of padding (one per append), then creates GROUPS groups from the start, one by one,
printing VmRSS after each has filled its window; then polls count=300 once and prints the
answer's size and VmHWM.
"""
import json, os, socket, subprocess, sys, tempfile, time, urllib.request

binary, events, size, groups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
data = tempfile.mkdtemp()
proc = subprocess.Popen([binary, "serve", "--data-dir", data, "--listen", f"127.0.0.1:{port}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"
def req(method, path, body=None):
    r = urllib.request.Request(base + path, method=method,
                               data=None if body is None else json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
    with urllib.request.urlopen(r, timeout=60) as resp:
        return resp.read()
def status(field):
    for line in open(f"/proc/{proc.pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
try:
    for _ in range(100):
        try: req("GET", "/health/ready"); break
        except Exception: time.sleep(0.1)
    pad = "x" * size
    for i in range(events):
        req("POST", f"/v1/streams/big-{i % 7}", {"events": [{"type": "Large", "data": {"i": i, "pad": pad}}]})
    time.sleep(1)
    print(f"{events} events of {size} bytes stored: VmRSS {status('VmRSS:')} MB")
    for g in range(groups):
        req("POST", "/v1/groups", {"name": f"g{g}", "source": {"all": {}}, "from": "start"})
        time.sleep(2 if groups <= 10 else 0.2)
        if groups <= 10 or (g + 1) % 25 == 0:
            time.sleep(0 if groups <= 10 else 2)
            print(f"group {g + 1} idle: VmRSS {status('VmRSS:')} MB")
    body = req("GET", "/v1/groups/g0/messages?count=300&wait=1000")
    print(f"poll count=300: {len(json.loads(body).get('messages', json.loads(body)) if body.startswith(b'{') else json.loads(body))} messages, {len(body) // 1024 // 1024} MB body; VmHWM {status('VmHWM:')} MB")
finally:
    proc.kill(); proc.wait()
