#!/usr/bin/env python3
"""A Signpost client on generated stubs: register with a ttl, keep the lease alive on the
KeepAlive stream, discover, watch, deregister -- printing what happens.

    ./generate.sh && python3 client.py --registry 127.0.0.1:7070
"""

import argparse
import os
import queue
import sys
import threading
import time

sys.path.insert(0, os.environ.get("SIGNPOST_STUBS", os.path.join(os.path.dirname(__file__), "gen")))

import grpc  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from signpost.v1 import registry_pb2 as pb  # noqa: E402
from signpost.v1 import registry_pb2_grpc as rpc  # noqa: E402


def keep_alive(stub, lease_id, every, stop, answers):
    """Sends the lease id every `every` seconds on one KeepAlive stream until `stop` is set."""

    def requests():
        while not stop.is_set():
            yield pb.KeepAliveRequest(lease_id=lease_id)
            stop.wait(every)

    for answer in stub.KeepAlive(requests()):
        answers.put(answer)
        if stop.is_set():
            break


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", default="127.0.0.1:7070")
    parser.add_argument("--service", default="py-greeter")
    parser.add_argument("--id", default="py-1")
    args = parser.parse_args()

    channel = grpc.insecure_channel(args.registry)
    stub = rpc.RegistryServiceStub(channel)

    # Watch first, so the registration shows up as an event.
    watch = stub.Watch(pb.WatchRequest(service=args.service))
    first = next(watch)
    print(f"watch: reset with {len(first.events)} instances at revision {first.revision}")

    ttl = duration_pb2.Duration(seconds=3)
    instance = pb.Instance(
        service=args.service, id=args.id, address="127.0.0.1", port=50051,
        tags=["python"], metadata={"lang": "python"},
    )
    registered = stub.Register(pb.RegisterRequest(instance=instance, ttl=ttl))
    print(f"registered {registered.instance.service}/{registered.instance.id} "
          f"lease={registered.lease_id} ttl={registered.ttl.seconds}s revision={registered.revision}")

    for message in watch:
        if message.events:
            e = message.events[0]
            print(f"watch: {pb.EventType.Name(e.type)} {e.instance.id} "
                  f"{e.instance.address}:{e.instance.port}")
            break

    # Keep the lease alive at ttl/3 for longer than the ttl: the instance must stay.
    stop, answers = threading.Event(), queue.Queue()
    pinger = threading.Thread(target=keep_alive, args=(stub, registered.lease_id, 1.0, stop, answers))
    pinger.start()
    time.sleep(4.5)
    alive = answers.get(timeout=5)
    print(f"keepalive: lease={alive.lease_id} ttl={alive.ttl.seconds}s expired={alive.expired}")

    found = stub.Discover(pb.DiscoverRequest(service=args.service, selector="lang=python"))
    print(f"discover: {[i.id for i in found.instances]} at revision {found.revision} "
          f"(still registered after {4.5}s on a {ttl.seconds}s ttl)")

    gone = stub.Deregister(pb.DeregisterRequest(service=args.service, id=args.id))
    print(f"deregistered existed={gone.existed}")
    for message in watch:
        if message.events:
            e = message.events[0]
            print(f"watch: {pb.EventType.Name(e.type)} {e.instance.id} "
                  f"reason={pb.RemovalReason.Name(e.reason)}")
            break
    stop.set()
    pinger.join(timeout=5)
    watch.cancel()

    try:
        stub.Discover(pb.DiscoverRequest(service="Bad Name"))
    except grpc.RpcError as error:
        print(f"bad input: {error.code().name}: {error.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
