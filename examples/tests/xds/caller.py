#!/usr/bin/env python3
"""Calls greeter.v1.GreeterService/SayHello through a plain grpcio channel to an `xds:///` target,
one call at a time, and prints one line per call: `ok <instance_id>` or `err <CODE> <details>`.

The channel is configured by the bootstrap file that GRPC_XDS_BOOTSTRAP names; nothing here
knows about Signpost. The greeter stubs are generated into a temporary folder at start.
"""

import argparse
import os
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc


def stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="greeter-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main([
        "protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
        f"--grpc_python_out={out}", "greeter/v1/greeter.proto",
    ])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    for package in ("greeter", "greeter/v1"):
        open(os.path.join(out, package, "__init__.py"), "a").close()
    sys.path.insert(0, out)
    from greeter.v1 import greeter_pb2, greeter_pb2_grpc
    return greeter_pb2, greeter_pb2_grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--pause-ms", type=float, default=2)
    parser.add_argument("--timeout", type=float, default=5)
    args = parser.parse_args()
    pb, pb_grpc = stubs(args.proto_dir)
    channel = grpc.insecure_channel(args.target)
    stub = pb_grpc.GreeterServiceStub(channel)
    print("calling", flush=True)
    while True:
        try:
            answer = stub.SayHello(pb.SayHelloRequest(name="py"), timeout=args.timeout)
            print(f"ok {answer.instance_id}", flush=True)
        except grpc.RpcError as e:
            details = (e.details() or "").replace("\n", " ")
            print(f"err {e.code().name} {details}", flush=True)
        time.sleep(args.pause_ms / 1000)


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
