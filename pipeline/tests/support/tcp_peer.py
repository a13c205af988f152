"""A TCP server or client moving exactly known byte counts, for tcplake's eBPF tests.

server PORT CONNS REQ RESP      accept CONNS connections one after another; on each read exactly REQ
                                bytes, send RESP bytes, then wait for the peer to close or reset it.
client PORT CONNS REQ RESP RSTS open CONNS connections; on each send REQ bytes and read exactly RESP
                                bytes; the first RSTS connections close with RST (SO_LINGER 0), the
                                rest with FIN.

The process renames itself (comm) to tl-server / tl-client so the test can check attribution.
Prints READY when listening (server) and DONE when finished. Exits non-zero on any mismatch.
"""
import ctypes
import socket
import struct
import sys


def set_comm(name):
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def recv_exactly(s, n):
    got = 0
    while got < n:
        chunk = s.recv(min(65536, n - got))
        if not chunk:
            raise SystemExit(f"peer closed after {got} of {n} bytes")
        got += len(chunk)


def server(port, conns, req, resp):
    set_comm("tl-server")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("READY", flush=True)
    for _ in range(conns):
        c, _ = srv.accept()
        recv_exactly(c, req)
        c.sendall(b"s" * resp)
        try:
            while c.recv(65536):
                pass
        except ConnectionResetError:
            pass
        c.close()
    print("DONE", flush=True)


def client(port, conns, req, resp, rsts):
    set_comm("tl-client")
    for i in range(conns):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"c" * req)
        recv_exactly(s, resp)
        if i < rsts:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    role, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    {"server": server, "client": client}[role](*args)
