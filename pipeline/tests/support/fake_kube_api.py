"""A fake Kubernetes API server for tcplake's pod-name tests (no real cluster exists on test machines).

Usage: fake_kube_api.py PODS.json     PODS.json = {"initial": [pod, ...], "later": [pod, ...]}

Serves exactly what kube-runtime's `watcher` (kube 2.0, ListWatch strategy) asks for, over plain HTTP
on 127.0.0.1 with no auth:

  GET /api/v1/pods?limit=..&fieldSelector=..          a PodList of the "initial" pods, all in one page
                                                      (limit is ignored, no `continue`), with
                                                      metadata.resourceVersion = the newest of them.
  GET /api/v1/pods?watch=true&resourceVersion=RV&..   200, chunked, newline-delimited WatchEvents: one
                                                      ADDED per pod (initial or later) whose
                                                      resourceVersion is newer than RV (all of them if
                                                      RV is absent or "0"), each in its own chunk; then
                                                      silence until the client goes away or
                                                      timeoutSeconds passes, when a BOOKMARK (if
                                                      allowWatchBookmarks=true) ends the stream.
  /api/v1/namespaces/NS/pods                          the same, restricted to namespace NS.
  anything else                                       404 with a Kubernetes Status.

Because events are replayed by resourceVersion like a real API server, the watcher's re-watch (from
the last version it saw, after timeoutSeconds) does not get the "later" pods again. To keep that
order well defined, pods' resourceVersions are made numeric and increasing at load time: "initial"
pods first, then "later" ones in file order; a missing, non-numeric or non-increasing version is
replaced by the previous one + 1. sendInitialEvents=true (streaming lists) is served too: the
"initial" pods as ADDED, a BOOKMARK annotated k8s.io/initial-events-end, then the "later" pods.
Selectors: fieldSelector (any dotted path, e.g. spec.nodeName) and labelSelector, each with
comma-separated k=v, k==v, k!=v terms.

Prints `READY <port>` once listening, then `<METHOD> <path?query>` per request, on stdout.
"""
import json
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PODS_PATH = re.compile(r"^/api/v1(?:/namespaces/([^/]+))?/pods$")
print_lock = threading.Lock()


def say(line):
    with print_lock:
        print(line, flush=True)


def load(path):
    """The event log: [(rv, pod)] in order, and the version a list returns (newest initial pod)."""
    with open(path) as f:
        data = json.load(f)
    log, rv = [], 0
    for group in ("initial", "later"):
        for pod in data.get(group, []):
            meta = pod.setdefault("metadata", {})
            try:
                mine = int(meta.get("resourceVersion", ""))
            except ValueError:
                mine = 0
            rv = mine if mine > rv else rv + 1
            meta["resourceVersion"] = str(rv)
            log.append((rv, pod, group))
        if group == "initial":
            list_rv = max(rv, 1)
    return log, list_rv


def lookup(obj, dotted):
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def matches(terms, get):
    """Equality-based selector terms (k=v, k==v, k!=v, comma-separated) against get(key)."""
    for term in filter(None, (t.strip() for t in (terms or "").split(","))):
        neg = "!=" in term
        key, _, want = term.partition("!=" if neg else "==" if "==" in term else "=")
        if (get(key.strip()) == want.strip()) == neg:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked responses

    def log_message(self, *args):  # requests are printed to stdout instead
        pass

    def send_json(self, code, body):
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def not_found(self):
        self.send_json(404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                             "message": f"the server could not find the requested resource ({self.path})",
                             "reason": "NotFound", "details": {}, "code": 404})

    do_POST = do_PUT = do_PATCH = do_DELETE = lambda self: (say(f"{self.command} {self.path}"), self.not_found())

    def do_GET(self):
        say(f"GET {self.path}")
        url = urlsplit(self.path)
        m = PODS_PATH.match(url.path)
        if not m:
            return self.not_found()
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        ns = m.group(1)

        def wanted(pod):
            labels = pod.get("metadata", {}).get("labels") or {}
            return ((ns is None or lookup(pod, "metadata.namespace") == ns)
                    and matches(q.get("fieldSelector"), lambda k: lookup(pod, k))
                    and matches(q.get("labelSelector"), lambda k: str(labels.get(k, ""))))

        if q.get("watch") not in ("true", "1"):
            items = [pod for _, pod, group in LOG if group == "initial" and wanted(pod)]
            return self.send_json(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": str(LIST_RV)}, "items": items})
        self.watch(q, wanted)

    def chunk(self, obj):
        raw = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))

    def bookmark(self, rv, annotations=None):
        meta = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        self.chunk({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": meta}})

    def watch(self, q, wanted):
        try:
            since = int(q.get("resourceVersion") or 0)
        except ValueError:
            since = 0
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if q.get("sendInitialEvents") == "true":
                for _, pod, group in LOG:
                    if group == "initial" and wanted(pod):
                        self.chunk({"type": "ADDED", "object": pod})
                self.bookmark(LIST_RV, {"k8s.io/initial-events-end": "true"})
                since = max(since, LIST_RV)
            for rv, pod, _ in LOG:
                if rv > since and wanted(pod):
                    self.chunk({"type": "ADDED", "object": pod})
            if not self.idle(timeout):
                self.close_connection = True
                return
            if q.get("allowWatchBookmarks") == "true":
                self.bookmark(LOG[-1][0] if LOG else LIST_RV)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def idle(self, timeout):
        """Wait, sending nothing; True when the timeout passed, False when the client went away."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            left = 0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic()))
            if select.select([self.connection], [], [], left)[0]:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return False  # EOF: the client closed
                except OSError:
                    return False
                time.sleep(left)  # unexpected bytes from the client: leave them, keep waiting
        return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    LOG, LIST_RV = load(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    say(f"READY {server.server_address[1]}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
