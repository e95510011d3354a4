"""DNS clients for the DNS tests: dnspython as an application resolves, and a packet fuzzer.

    client.py resolve HOST PORT NAME TYPE   one record per line, sorted; "NXDOMAIN" or "NODATA"
    client.py fuzz HOST PORT COUNT SEED     random and mangled packets over UDP and TCP
"""

import random
import socket
import sys

import time

import dns.message
import dns.query
import dns.rdatatype
import dns.resolver


def resolve(host, port, name, rtype):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 10
    try:
        # A truncated UDP answer is asked again over TCP, as every stub resolver does.
        answer = resolver.resolve(name, rtype, raise_on_no_answer=True)
    except dns.resolver.NXDOMAIN:
        print("NXDOMAIN")
        return
    except dns.resolver.NoAnswer:
        print("NODATA")
        return
    for line in sorted(r.to_text() for r in answer):
        print(line)
    print(f"ttl {answer.rrset.ttl}")


def fuzz(host, port, count, seed):
    rng = random.Random(int(seed))
    good = dns.message.make_query("web.service.signpost.", "SRV", use_edns=True).to_wire()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = (host, int(port))
    for i in range(int(count)):
        kind = i % 4
        if kind == 0:
            packet = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600)))
        elif kind == 1:
            # A real query with some bytes changed: gets past the header often.
            packet = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                packet[rng.randrange(len(packet))] = rng.getrandbits(8)
            packet = bytes(packet)
        elif kind == 2:
            packet = good[: rng.randrange(len(good))]
        else:
            # Counts that promise more records than there are, and a name pointer loop.
            packet = good[:2] + b"\x01\x00\xff\xff\xff\xff\xff\xff\xff\xff" + b"\xc0\x0c" * 8
        udp.sendto(packet, target)
    for _ in range(20):
        with socket.create_connection(target, timeout=5) as tcp:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
            tcp.sendall(blob)
    # A length prefix promising 65535 bytes, then silence: the others are still answered, and the
    # server closes this one after its idle time (10 s) instead of holding it forever.
    silent = socket.create_connection(target, timeout=30)
    silent.sendall(b"\xff\xff\x00")
    answer = dns.query.tcp(dns.message.make_query("web.service.signpost.", "A"), host, port=int(port), timeout=5)
    assert answer.answer, answer
    started = time.monotonic()
    closed = silent.recv(1) == b""
    print(f"silent connection closed={closed} after {time.monotonic() - started:.1f}s")
    silent.close()
    print("sent")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"resolve": resolve, "fuzz": fuzz}[command](*args)
