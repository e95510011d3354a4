#!/usr/bin/env python3
"""Backends for the gateway's tests, as a user would write them, and the clients that call them.

    backends.py http --id a            HTTP/1.1 server (http.server); prints "serving on PORT"
                                       (--idle-close S: closes a connection idle S seconds, and
                                       prints "closed an idle connection"; --cut: every
                                       answer claims 100 bytes more than it sends, then the
                                       connection closes, as a backend dying mid-answer)
    backends.py ws --id a              WebSocket echo server (websockets)
    backends.py grpc --id a --stubs D  gRPC greeter (stubs in D) with a streaming method
    backends.py get URL N              N GETs; prints "ID COUNT" per answering instance
    backends.py load URL STOPFILE      GETs on 8 threads until STOPFILE exists; prints "ok N failed M"
    backends.py post URL BODY          one POST; prints "STATUS BODY"
    backends.py wsecho URL TEXT        one WebSocket round trip; prints what came back
    backends.py greet ADDR NAME --stubs D   SayHello through ADDR; prints the answer
    backends.py stream ADDR DIR --stubs D   the streaming call (see below)

Streaming is shown unbuffered without timing: the server sends its first message, then waits
until the client, having received it, creates a file; only then does it send the second. A proxy
that held the first message back would leave both waiting until the deadline.
"""

import argparse
import http.server
import json
import os
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request


def http_backend(args):
    marks = args.marks

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        # With --idle-close, a keep-alive connection that idles that long is closed, as
        # servers with a keep-alive timeout do.
        timeout = args.idle_close or None

        def log_message(self, *a):
            pass

        def log_error(self, format, *a):
            if "timed out" in format % a:
                print("closed an idle connection", flush=True)

        def answer(self, status, body, ctype="text/plain"):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data) + (100 if args.cut else 0)))
            self.end_headers()
            self.wfile.write(data)
            if args.cut:
                self.wfile.flush()
                self.close_connection = True

        def huge(self):
            # More than any socket buffers hold: a caller that does not read stops it.
            piece = b"x" * (1024 * 1024)
            self.send_response(200)
            self.send_header("Content-Length", str(256 * len(piece)))
            self.end_headers()
            for _ in range(256):
                self.wfile.write(piece)

        def do_GET(self):
            if self.path.startswith("/whoami"):
                self.answer(args.status, args.id)
            elif self.path.startswith("/headers"):
                seen = {k.lower(): v for k, v in self.headers.items()}
                self.answer(200, json.dumps({"path": self.path, "headers": seen}), "application/json")
            elif self.path.startswith("/conn"):
                # Which connection of the caller's this is: its port on the caller's side.
                self.answer(200, str(self.client_address[1]))
            elif self.path.startswith("/big"):
                self.answer(200, b"x" * (256 * 1024), "application/octet-stream")
            elif self.path.startswith("/huge"):
                self.huge()
            elif self.path.startswith("/hang"):
                time.sleep(3600)
            elif self.path.startswith("/unavailable"):
                self.answer(503, "down for maintenance")
            elif self.path.startswith("/until-close"):
                # No length and no chunks: the body ends when the connection does.
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"all of it from " + args.id.encode())
                self.close_connection = True
            elif self.path.startswith("/chunks"):
                # Chunked: the first chunk, then the second once the client says it has the first.
                flag = self.path.split("flag=", 1)[1]
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"6\r\nfirst\n\r\n")
                self.wfile.flush()
                deadline = time.time() + 20
                while not os.path.exists(flag) and time.time() < deadline:
                    time.sleep(0.01)
                self.wfile.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
            else:
                self.answer(404, "no such page on " + args.id)

        def do_HEAD(self):
            self.send_response(args.status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(args.id.encode())))
            self.end_headers()

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path.startswith("/huge"):
                self.huge()
                return
            if self.path.startswith("/big"):
                self.answer(200, b"x" * (256 * 1024), "application/octet-stream")
                return
            if self.path.startswith("/hold") and marks:
                # Say it arrived, then hold the request until this process is killed.
                open(os.path.join(marks, "arrived-" + args.id), "w").close()
                time.sleep(3600)
            self.answer(200, args.id + ":" + body.decode(errors="replace"))

        do_PUT = do_POST

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", args.port), Handler)
    print("serving on", server.server_address[1], flush=True)
    server.serve_forever()


def ws_backend(args):
    import asyncio
    import websockets

    async def echo(ws):
        async for message in ws:
            await ws.send(f"{args.id}:{message}")

    async def main():
        async with websockets.serve(echo, "127.0.0.1", args.port) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            print("serving on", port, flush=True)
            await asyncio.Future()

    asyncio.run(main())


def stubs(path):
    sys.path.insert(0, path)
    from greeter.v1 import greeter_pb2, greeter_pb2_grpc

    return greeter_pb2, greeter_pb2_grpc


STREAM = "/greeter.v1.GreeterService/Count"


def grpc_backend(args):
    from concurrent import futures

    import grpc

    pb, rpc = stubs(args.stubs)

    class Greeter(rpc.GreeterServiceServicer):
        def SayHello(self, request, context):
            if request.name == "nobody":
                context.abort(grpc.StatusCode.NOT_FOUND, "there is nobody to greet")
            return pb.SayHelloResponse(message="hello " + request.name, instance_id=args.id)

    def count(request, context):
        flag = request.decode()
        yield b"one"
        deadline = time.time() + 20
        while not os.path.exists(flag) and time.time() < deadline:
            time.sleep(0.01)
        yield b"two"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rpc.add_GreeterServiceServicer_to_server(Greeter(), server)
    streaming = grpc.method_handlers_generic_handler(
        "greeter.v1.GreeterService",
        {"Count": grpc.unary_stream_rpc_method_handler(count)},
    )
    server.add_generic_rpc_handlers((streaming,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("serving on", port, flush=True)
    server.wait_for_termination()


def get(args):
    counts = {}
    for _ in range(args.n):
        with urllib.request.urlopen(args.url, timeout=10) as answer:
            who = answer.read().decode()
            counts[who] = counts.get(who, 0) + 1
    for who, n in sorted(counts.items()):
        print(who, n)


def load(args):
    ok = [0]
    failed = []
    lock = threading.Lock()

    def worker():
        while not os.path.exists(args.stop):
            try:
                with urllib.request.urlopen(args.url, timeout=10) as answer:
                    answer.read()
                with lock:
                    ok[0] += 1
            except Exception as e:  # noqa: BLE001 -- every failure is counted and shown
                with lock:
                    failed.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("ok", ok[0], "failed", len(failed), flush=True)
    for f in failed[:5]:
        print("failure:", f)


def post(args):
    request = urllib.request.Request(args.url, data=args.body.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            print(answer.status, answer.read().decode(), flush=True)
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode(), flush=True)


def wsecho(args):
    import asyncio
    import websockets

    async def main():
        async with websockets.connect(args.url) as ws:
            await ws.send(args.text)
            print(await ws.recv(), flush=True)
            await ws.send(args.text + "-again")
            print(await ws.recv(), flush=True)

    asyncio.run(main())


def greet(args):
    import grpc

    pb, rpc = stubs(args.stubs)
    with grpc.insecure_channel(args.addr) as channel:
        stub = rpc.GreeterServiceStub(channel)
        try:
            answer = stub.SayHello(pb.SayHelloRequest(name=args.name), timeout=10)
            print("answer", answer.instance_id, answer.message)
        except grpc.RpcError as e:
            print("error", e.code().name, e.details())


def stream(args):
    import grpc

    with grpc.insecure_channel(args.addr) as channel:
        call = channel.unary_stream(STREAM)
        flag = os.path.join(args.dir, "got-first")
        messages = call(flag.encode(), timeout=15)
        first = next(messages)
        open(flag, "w").close()
        rest = list(messages)
        print("stream", first.decode(), *[m.decode() for m in rest])


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("http", "ws", "grpc"):
        s = sub.add_parser(name)
        s.add_argument("--id", required=True)
        s.add_argument("--port", type=int, default=0)
        s.add_argument("--marks", default="")
        s.add_argument("--stubs", default="")
        s.add_argument("--status", type=int, default=200, help="what /whoami answers")
        s.add_argument("--idle-close", type=float, default=0)
        s.add_argument("--cut", action="store_true")
    s = sub.add_parser("get")
    s.add_argument("url")
    s.add_argument("n", type=int)
    s = sub.add_parser("load")
    s.add_argument("url")
    s.add_argument("stop")
    s = sub.add_parser("post")
    s.add_argument("url")
    s.add_argument("body")
    s = sub.add_parser("wsecho")
    s.add_argument("url")
    s.add_argument("text")
    s = sub.add_parser("greet")
    s.add_argument("addr")
    s.add_argument("name")
    s.add_argument("--stubs", required=True)
    s = sub.add_parser("stream")
    s.add_argument("addr")
    s.add_argument("dir")
    s.add_argument("--stubs", default="")
    args = p.parse_args()
    {
        "http": http_backend,
        "ws": ws_backend,
        "grpc": grpc_backend,
        "get": get,
        "load": load,
        "post": post,
        "wsecho": wsecho,
        "greet": greet,
        "stream": stream,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
