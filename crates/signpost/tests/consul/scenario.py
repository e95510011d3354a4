"""Existing Consul client code against Signpost's Consul API, as its users write it.

    scenario.py HOST PORT     run with python-consul or py-consul on PYTHONPATH (both are `consul`)

Real HTTP backends whose /health the scenario turns bad and good again; every wait is on a
condition with a deadline. Prints one line per step, and "done" at the end; any failure raises.
"""

import http.server
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import consul

DEADLINE = 15.0


class Backend:
    """An HTTP server whose /health answers 200 or 500, as the test sets it."""

    def __init__(self, name):
        self.healthy = True
        self.seen = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                backend.seen.append((self.command, self.headers.get("X-Probe")))
                self.send_response(200 if backend.healthy else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                if self.path == "/health":
                    code = 200 if backend.healthy else 500
                else:
                    code = 200
                body = name.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self):
        return f"http://127.0.0.1:{self.port}/health"


def until(what, condition):
    deadline = time.monotonic() + DEADLINE
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        time.sleep(0.05)


def step(text):
    print(text, flush=True)


def passing_ids(c, service, **kw):
    _, nodes = c.health.service(service, passing=True, **kw)
    return sorted(n["Service"]["ID"] for n in nodes)


def raw(host, port, method, path, body=None):
    """(status, headers, text) of one request, for what the client libraries do not expose."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def main(host, port):
    port = int(port)
    c = consul.Consul(host=host, port=port)
    one, two = Backend("one"), Backend("two")

    # The seed's own calls: register with an HTTP check, then read health.
    for sid, backend in (("web-1", one), ("web-2", two)):
        c.agent.service.register(
            "web",
            service_id=sid,
            address="127.0.0.1",
            port=backend.port,
            tags=["v1", sid],
            check=consul.Check.http(backend.url(), interval="1s", timeout="500ms"),
        )
    index, nodes = c.health.service("web")
    assert int(index) > 0, index
    assert sorted(n["Service"]["ID"] for n in nodes) == ["web-1", "web-2"], nodes
    for n in nodes:
        assert n["Service"]["Address"] == "127.0.0.1"
        assert n["Service"]["Tags"] == ["v1", n["Service"]["ID"]]
        assert n["Checks"][0]["ServiceID"] == n["Service"]["ID"]
    step("registered two instances with HTTP checks")

    until("both pass their checks", lambda: passing_ids(c, "web") == ["web-1", "web-2"])
    _, nodes = c.health.service("web")
    chosen = sorted(n["Service"]["ID"] for n in nodes if n["Checks"][0]["Status"] == "passing")
    assert chosen == ["web-1", "web-2"], nodes
    step("both passing; Checks[0] is each instance's own check")

    two.healthy = False
    until("web-2 turns critical", lambda: passing_ids(c, "web") == ["web-1"])
    _, nodes = c.health.service("web")
    by_id = {n["Service"]["ID"]: n for n in nodes}
    assert by_id["web-2"]["Checks"][0]["Status"] == "critical", by_id["web-2"]
    assert "500" in by_id["web-2"]["Checks"][0]["Output"], by_id["web-2"]
    chosen = [n["Service"]["ID"] for n in nodes if n["Checks"][0]["Status"] == "passing"]
    assert chosen == ["web-1"], nodes
    step("a failing health endpoint leaves the passing list, and Checks[0] says so")

    assert passing_ids(c, "web", tag="web-1") == ["web-1"]
    assert passing_ids(c, "web", tag="v2") == []
    step("tag filters")

    # A blocking query returns when its own service changes, not when another one does.
    index, _ = c.health.service("web")
    answer = {}

    def block():
        answer["result"] = c.health.service("web", index=index, wait="30s")
        answer["at"] = time.monotonic()

    waiter = threading.Thread(target=block)
    waiter.start()
    c.agent.service.register("other", service_id="other-1", address="127.0.0.1", port=one.port)
    until("other is listed", lambda: "other" in c.catalog.services()[1])
    waiter.join(1.0)
    assert waiter.is_alive(), f"the blocking query on web returned for a change of other: {answer}"
    two.healthy = True
    changed = time.monotonic()
    waiter.join(DEADLINE)
    assert not waiter.is_alive(), "the blocking query did not return when web changed"
    new_index, nodes = answer["result"]
    assert int(new_index) > int(index), (index, new_index)
    assert {n["Service"]["ID"]: n["Checks"][0]["Status"] for n in nodes}["web-2"] == "passing"
    step(f"blocking query woke {answer['at'] - changed:.3f}s after its service changed, not for another")

    # A blocking query that sees no change returns at the end of its wait, with the same index.
    started = time.monotonic()
    same, _ = c.health.service("web", index=new_index, wait="1s")
    took = time.monotonic() - started
    assert same == new_index and 0.9 <= took <= 5, (same, new_index, took)
    step("an idle blocking query returns after its wait with the same index")

    index, services = c.catalog.services()
    assert services["web"] == ["v1", "web-1", "web-2"], services
    assert services["other"] == [], services
    answer.clear()

    def block_catalog():
        answer["result"] = c.catalog.services(index=index, wait="30s")

    waiter = threading.Thread(target=block_catalog)
    waiter.start()
    c.agent.service.register("db", service_id="db-1", address="127.0.0.1", port=one.port, tags=["primary"])
    waiter.join(DEADLINE)
    assert not waiter.is_alive(), "a blocking catalog query did not return on a new service"
    assert answer["result"][1]["db"] == ["primary"], answer
    step("catalog services, blocking on a new service")

    # A TTL check: critical until the instance reports, then what it reports.
    c.agent.service.register("job", service_id="job-1", address="127.0.0.1", port=one.port, check=consul.Check.ttl("30s"))
    _, nodes = c.health.service("job")
    assert nodes[0]["Checks"][0]["Status"] == "critical", nodes
    assert c.agent.check.ttl_pass("service:job-1", "all good")
    _, nodes = c.health.service("job", passing=True)
    assert [n["Checks"][0]["Output"] for n in nodes] == ["all good"], nodes
    c.agent.check.ttl_warn("service:job-1", "slow")
    assert passing_ids(c, "job") == []
    _, nodes = c.health.service("job")
    assert nodes[0]["Checks"][0]["Status"] == "warning", nodes
    c.agent.check.ttl_fail("service:job-1", "down")
    _, nodes = c.health.service("job")
    assert nodes[0]["Checks"][0]["Status"] == "critical", nodes
    c.agent.check.ttl_pass("service:job-1", "back")
    assert passing_ids(c, "job") == ["job-1"]
    c.agent.check.ttl_pass("service:job-1", "still fine")
    _, nodes = c.health.service("job")
    assert nodes[0]["Checks"][0]["Output"] == "still fine", nodes
    step("a TTL check follows pass, warn and fail")

    # An HTTP check with its own method and headers, as Consul's checks may have.
    probed = Backend("probed")
    status, _, text = raw(host, port, "PUT", "/v1/agent/service/register", {
        "Name": "probed", "ID": "probed-1", "Address": "127.0.0.1", "Port": probed.port,
        "Check": {"HTTP": f"http://127.0.0.1:{probed.port}/ready", "Interval": "1s",
                  "Method": "HEAD", "Header": {"X-Probe": ["signpost"]}}})
    assert status == 200, (status, text)
    until("the HEAD check passes", lambda: passing_ids(c, "probed") == ["probed-1"])
    assert ("HEAD", "signpost") in probed.seen, probed.seen
    step("an HTTP check sends its method and headers")

    services = c.agent.services()
    assert services["web-1"]["Service"] == "web" and services["web-1"]["Port"] == one.port, services
    # What Prometheus' consul_sd_configs reads before it watches the catalog.
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == "dc1" and me["Config"]["NodeName"] == "signpost", me
    step("agent services and agent self")

    # What the libraries do not reach: filters, blocking with raw indexes, errors.
    status, headers, text = raw(host, port, "GET", "/v1/health/service/web?filter=" + urllib.parse.quote('"web-2" in Service.Tags'))
    assert status == 200 and [e["Service"]["ID"] for e in json.loads(text)] == ["web-2"], (status, text)
    assert int(headers["X-Consul-Index"]) > 0
    status, _, text = raw(host, port, "GET", "/v1/health/service/web?filter=" + urllib.parse.quote("Service.ID matches \"w.*\""))
    assert status == 400 and "matches" in text, (status, text)
    status, _, text = raw(host, port, "PUT", "/v1/agent/service/register", {"Name": "Bad Name", "Port": 1})
    assert status == 400 and "Name" in text, (status, text)
    status, _, text = raw(host, port, "PUT", "/v1/agent/service/register", {"Name": "x", "Port": 1, "Check": {"Args": ["true"], "Interval": "5s"}})
    assert status == 400 and "Check.Args" in text, (status, text)
    status, _, text = raw(host, port, "PUT", "/v1/agent/service/deregister/nothing-here")
    assert status == 404, (status, text)
    status, _, text = raw(host, port, "GET", "/v1/kv/some/key")
    assert status == 404 and "docs/consul.md" in text, (status, text)
    status, _, _ = raw(host, port, "POST", "/v1/health/service/web")
    assert status == 405
    step("filters and errors")

    # Registered again without a check, an instance keeps the one it has, as on a Consul
    # agent; with replace-existing-checks it has none.
    again = {"Name": "web", "ID": "web-1", "Address": "127.0.0.1", "Port": one.port, "Tags": ["v1", "web-1"]}
    status, _, text = raw(host, port, "PUT", "/v1/agent/service/register", again)
    assert status == 200, (status, text)
    _, nodes = c.health.service("web")
    assert {n["Service"]["ID"]: n["Checks"][0]["Type"] for n in nodes}["web-1"] == "http", nodes
    status, _, text = raw(host, port, "PUT", "/v1/agent/service/register?replace-existing-checks=true", again)
    assert status == 200, (status, text)
    _, nodes = c.health.service("web")
    assert {n["Service"]["ID"]: n["Checks"][0]["Type"] for n in nodes}["web-1"] == "", nodes
    step("replace-existing-checks")

    c.agent.service.deregister("web-2")
    _, nodes = c.health.service("web")
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"], nodes
    step("deregistered")
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
