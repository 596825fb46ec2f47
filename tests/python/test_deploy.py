"""Scaled out, with the real processes: three inferd replicas (the release binary, SmolLM2) behind
Debian's HAProxy running the shipped config (deploy/haproxy/haproxy.cfg, rendered for loopback
ports by deploy/haproxy/render.sh, exactly as on bare metal). Through the balancer: streams arrive
token by token and a client that leaves frees its sequence; 64 concurrent streams spread over the
replicas; a replica SIGKILLed mid-load fails only its own requests, cleanly, and gets traffic
again once restarted; a replica SIGTERMed mid-load drains with zero failed requests and exits 0;
an `x-session-id` keeps a conversation on one replica, whose prefix cache hits.

scripts/test.sh installs haproxy (scripts/install-system-deps.sh) before the suite runs."""
import concurrent.futures as cf
import csv
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
import requests

from conftest import API_KEY, ROOT, Daemon, free_port

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smol"
# The drain delay must outlast HAProxy's check interval x fall count (1 s x 2). The grace for
# in-flight requests is long, so a slow or busy machine still lets every drained stream finish
# (the drain test asserts zero failures; with the default 30 s a loaded 2-core CI machine cut
# some of its 128-token streams).
REPLICA_FLAGS = ("--drain-delay", "4", "--shutdown-timeout", "180", "--kv-cache-memory", "64MiB",
                 "--max-model-len", "1024", "--max-num-seqs", "32")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPLICAS = ("inferd1", "inferd2", "inferd3")
TIMEOUT = (10, 120)  # connect, read: past it a request counts as hung


def chat(content: str, max_tokens: int, stream: bool = True, **extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            **extra}


class Cluster:
    def __init__(self, tmp):
        self.replicas, self.haproxy = [], None
        try:
            self.start_all(tmp)
        except BaseException:
            self.close()  # no replica outlives a failed start
            raise

    def start_all(self, tmp):
        haproxy = shutil.which("haproxy")
        assert haproxy, "haproxy is missing: scripts/install-system-deps.sh installs it"
        self.ports = [free_port() for _ in REPLICAS]
        for i in range(len(REPLICAS)):
            self.replicas.append(self.start(i))
        self.lb = f"http://127.0.0.1:{free_port()}"
        self.lb_metrics = f"http://127.0.0.1:{free_port()}"
        rendered = subprocess.run(
            [str(ROOT / "deploy" / "haproxy" / "render.sh"),
             *[f"127.0.0.1:{p}" for p in self.ports]],
            check=True, capture_output=True, text=True).stdout
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(rendered)
        env = {**os.environ, "INFERD_LB_BIND": self.lb.removeprefix("http://"),
               "INFERD_LB_METRICS": self.lb_metrics.removeprefix("http://")}
        subprocess.run([haproxy, "-c", "-q", "-f", str(cfg)], env=env, check=True)
        self.lb_log = open(ROOT / "target" / "pytest-haproxy.log", "w")
        self.haproxy = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], env=env,
                                        stdout=self.lb_log, stderr=subprocess.STDOUT)
        self.wait_states({r: "UP" for r in REPLICAS})

    def start(self, i: int) -> Daemon:
        """Replica `i` on its own port (a restart takes the same one), once ready."""
        return Daemon(MODEL, NAME, *REPLICA_FLAGS, port=self.ports[i])

    def replace(self, i: int):
        """Start replica `i` again after it died or exited, and wait until HAProxy sends to it."""
        self.replicas[i].log.close()
        self.replicas[i] = self.start(i)
        self.wait_states({REPLICAS[i]: "UP"})

    def post(self, body: dict, **kw) -> requests.Response:
        """A request through the balancer (a fresh connection each: requests' sessions are not
        for threads)."""
        headers = {**AUTH, **kw.pop("headers", {})}
        return requests.post(self.lb + "/v1/chat/completions", json=body, headers=headers,
                             timeout=TIMEOUT, **kw)

    def close(self):
        """Stop everything started so far (also after a failed start)."""
        if self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)
            self.lb_log.close()
        for r in self.replicas:
            r.stop()

    def states(self) -> dict:
        """HAProxy's view of each replica (UP, DOWN, ...), from its stats CSV."""
        try:
            with urllib.request.urlopen(self.lb_metrics + "/stats;csv", timeout=5) as r:
                text = r.read().decode().lstrip("# ")
        except OSError:  # HAProxy is not listening yet
            return {}
        return {row["svname"]: row["status"].split(" ")[0]
                for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "inferd" and row["svname"] in REPLICAS}

    def wait_states(self, want: dict, within: float = 60):
        deadline = time.time() + within
        while True:
            assert self.haproxy.poll() is None, "haproxy exited: see target/pytest-haproxy.log"
            states = self.states()
            if all(states.get(k) == v for k, v in want.items()):
                return
            assert time.time() < deadline, f"HAProxy sees {states}, want {want}"
            time.sleep(0.1)

    def stats(self, i: int) -> dict:
        r = requests.get(self.replicas[i].base + "/stats", headers=AUTH, timeout=10)
        return r.json()["models"][0]["engine"]

    def metric(self, i: int, name: str) -> float:
        """A Prometheus counter of replica `i`, summed over its label sets."""
        text = requests.get(self.replicas[i].base + "/metrics", headers=AUTH, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def wait_idle(self, i: int, within: float = 60) -> dict:
        deadline = time.time() + within
        while True:
            s = self.stats(i)
            if s["num_running"] == 0 and s["num_waiting"] == 0 \
                    and s["num_free_blocks"] == s["num_total_blocks"]:
                return s
            assert time.time() < deadline, f"replica {i} still busy: {s}"
            time.sleep(0.05)

    def stream(self, body: dict) -> dict:
        """One streaming request through the balancer, read to its end: which replica answered,
        whether it completed ([DONE] after a finish_reason), and the error if it did not."""
        out = {"replica": None, "ok": False, "error": None, "t0": time.time()}
        try:
            with self.post(body, stream=True) as r:
                out["replica"] = r.headers.get("x-inferd-replica")
                out["status"] = r.status_code
                data = [l[5:].strip() for l in r.iter_lines(decode_unicode=True)
                        if l.startswith("data:")]
                chunks = [json.loads(d) for d in data[:-1]]
                finished = any(c.get("finish_reason") for chunk in chunks
                               for c in chunk.get("choices", []))
                out["ok"] = r.status_code == 200 and data[-1:] == ["[DONE]"] and finished
                if not out["ok"]:
                    out["error"] = f"status {r.status_code}, last events {data[-2:]}"
        except requests.Timeout as e:  # a hang: never acceptable
            out["error"] = f"TIMEOUT {e!r}"
        except requests.RequestException as e:  # the connection broke: a clean failure
            out["error"] = repr(e)
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("lb"))
    yield c
    c.close()


def index(replica: str) -> int:
    return REPLICAS.index(replica)


def test_streams_arrive_token_by_token_and_a_client_that_leaves_frees_its_sequence(cluster):
    body = chat("Write a long story about a lighthouse.", max_tokens=900)
    with cluster.post(body, stream=True, headers={"x-request-id": "story-1"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "story-1", "the client's request id passes through"
        i = index(r.headers["x-inferd-replica"])
        events = []
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if sum(1 for e in events if e["choices"][0]["delta"].get("content")) >= 3:
                    break
        # SSE intact: each event a whole chat.completion.chunk.
        assert all(e["object"] == "chat.completion.chunk" for e in events), events
        # Tokens came through while the replica was still generating: the balancer does not
        # buffer the stream until its end.
        s = cluster.stats(i)
        assert s["num_running"] >= 1 and s["generation_tokens"] < 900, s
    # The client left: HAProxy closes its connection to the replica, which drops the sequence
    # long before its 900 tokens and frees its KV blocks.
    s = cluster.wait_idle(i)
    assert s["generation_tokens"] < 900, f"the generation ran to its end: {s}"


def test_load_spreads_over_the_replicas(cluster):
    before = [cluster.metric(i, "vllm:request_success_total") for i in range(3)]
    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda n: cluster.stream(chat(f"Count to {n}.", 16)), range(64)))
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    served = {r: sum(1 for x in results if x["replica"] == r) for r in REPLICAS}
    assert all(n >= 10 for n in served.values()), served
    after = [cluster.metric(i, "vllm:request_success_total") for i in range(3)]
    assert all(a - b >= 10 for a, b in zip(after, before)), (before, after)


def test_a_killed_replica_fails_only_its_own_requests_and_gets_traffic_after_restart(cluster):
    victim = 1
    with cf.ThreadPoolExecutor(48) as pool:
        futures = [pool.submit(cluster.stream, chat(f"Tell me about {n}.", 96)) for n in range(48)]
        deadline = time.time() + 60
        while cluster.stats(victim)["num_running"] < 2:
            assert time.time() < deadline, "the victim got no work"
            time.sleep(0.02)
        cluster.replicas[victim].proc.kill()
        results = [f.result(timeout=300) for f in futures]
    assert not [r for r in results if "TIMEOUT" in (r["error"] or "")], "a request hung"
    failed = [r for r in results if not r["ok"]]
    assert all(r["replica"] == REPLICAS[victim] for r in failed), failed
    assert any(r["ok"] and r["replica"] != REPLICAS[victim] for r in results), results

    # Every later request succeeds, on the others (the first ones may still find the dead
    # replica's port closed: HAProxy retries them elsewhere).
    with cf.ThreadPoolExecutor(8) as pool:
        later = list(pool.map(lambda n: cluster.stream(chat(f"Say {n}.", 8)), range(24)))
    assert all(r["ok"] for r in later), [r for r in later if not r["ok"]]
    assert not [r for r in later if r["replica"] == REPLICAS[victim]]
    cluster.wait_states({REPLICAS[victim]: "DOWN"})

    cluster.replace(victim)
    with cf.ThreadPoolExecutor(12) as pool:
        again = list(pool.map(lambda n: cluster.stream(chat(f"Name {n}.", 16)), range(24)))
    assert all(r["ok"] for r in again), [r for r in again if not r["ok"]]
    assert any(r["replica"] == REPLICAS[victim] for r in again), again


def test_a_sigtermed_replica_drains_with_zero_failed_requests_and_exits_0(cluster):
    leaving = 0
    name = REPLICAS[leaving]
    results, lock, stop = [], threading.Lock(), threading.Event()
    down_at = []

    def feed():
        while not stop.is_set():
            r = cluster.stream(chat("Say hello.", 8))
            r["after_down"] = bool(down_at) and r["t0"] > down_at[0]
            with lock:
                results.append(r)

    with cf.ThreadPoolExecutor(28) as pool:
        in_flight = [pool.submit(cluster.stream, chat(f"Tell a tale of {n}.", 128))
                     for n in range(24)]
        deadline = time.time() + 60
        while cluster.stats(leaving)["num_running"] < 2:
            assert time.time() < deadline, "the leaving replica got no work"
            time.sleep(0.02)
        feeders = [pool.submit(feed) for _ in range(4)]
        cluster.replicas[leaving].proc.terminate()  # SIGTERM
        deadline = time.time() + 60
        while cluster.states()[name] == "UP":
            assert time.time() < deadline, "HAProxy never took the draining replica out"
            time.sleep(0.05)
        down_at.append(time.time())
        code = cluster.replicas[leaving].proc.wait(timeout=240)
        stop.set()
        streams = [f.result(timeout=300) for f in in_flight]
        for f in feeders:
            f.result(timeout=300)

    assert code == 0, "the drained replica exits 0"
    everything = streams + results
    assert all(r["ok"] for r in everything), [r for r in everything if not r["ok"]]
    assert any(r["replica"] == name for r in streams), "it finished its in-flight streams"
    assert results, "new requests arrived during the drain"
    late = [r for r in results if r["after_down"] and r["replica"] == name]
    assert not late, f"taken out of rotation, yet served {late}"

    cluster.replace(leaving)


def test_a_session_id_keeps_a_conversation_on_one_replica_whose_prefix_cache_hits(cluster):
    system = ("You are a careful assistant for a lighthouse keeper's logbook. " * 12).strip()
    messages = [{"role": "system", "content": system}]
    seen = []
    for turn in range(6):
        messages.append({"role": "user", "content": f"Log entry {turn}: the lamp is lit."})
        r = cluster.post({"model": NAME, "messages": messages, "max_tokens": 8,
                          "temperature": 0}, headers={"x-session-id": "keeper-1"})
        assert r.status_code == 200, r.text
        assert re.fullmatch(r"[0-9a-f-]{36}", r.headers["x-request-id"]), "the balancer made one"
        seen.append(r.headers["x-inferd-replica"])
        if turn == 0:
            i = index(seen[0])
            hits_before = cluster.metric(i, "vllm:prefix_cache_hits_total")
        messages.append(r.json()["choices"][0]["message"])
    assert len(set(seen)) == 1, seen
    assert cluster.metric(i, "vllm:prefix_cache_hits_total") > hits_before

    # Other sessions are placed by least connections (several replicas), each kept where placed.
    def place(session):
        return [cluster.post(chat("Hi.", 4, stream=False),
                             headers={"x-session-id": session}).headers["x-inferd-replica"]
                for _ in range(3)]
    first = {}
    with cf.ThreadPoolExecutor(9) as pool:
        for s, where in zip(range(9), pool.map(place, [f"s-{n}" for n in range(9)])):
            assert len(set(where)) == 1, (s, where)
            first[s] = where[0]
    assert len(set(first.values())) >= 2, first


def test_the_dashboards_balancer_metrics_are_what_haproxy_exports(cluster):
    text = requests.get(cluster.lb_metrics + "/metrics", timeout=10).text
    exported = {re.split(r"[{ ]", l)[0] for l in text.splitlines() if l and l[0] != "#"}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "inferd.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"]
            for m in re.findall(r"\b(haproxy_[a-z0-9_]+)", t["expr"])}
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    assert 'haproxy_server_status{proxy="inferd",server="inferd1",state="UP"} 1' in text
