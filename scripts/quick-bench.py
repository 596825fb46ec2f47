#!/usr/bin/env python3
"""Rough serving figures against a running inferd (stdlib only): single-stream decode tok/s and
output tok/s with N concurrent streams. Loopback only, bounded request count.

usage: scripts/quick-bench.py [--base-url http://127.0.0.1:8000] [--model NAME]
                              [--concurrency 8] [--max-tokens 128]
"""
import argparse, json, threading, time, urllib.request, urllib.parse

p = argparse.ArgumentParser()
p.add_argument("--base-url", default="http://127.0.0.1:8000")
p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
p.add_argument("--concurrency", type=int, default=8)
p.add_argument("--max-tokens", type=int, default=128)
a = p.parse_args()
host = urllib.parse.urlparse(a.base_url).hostname
if host not in ("127.0.0.1", "localhost", "::1"):
    raise SystemExit("quick-bench only targets loopback addresses")

TOPICS = ["the ocean", "a mountain village", "a clockmaker", "the first snow", "a lighthouse",
          "a desert caravan", "an old library", "a night train", "a garden robot", "a jazz club",
          "the moon base", "a river ferry", "a bakery at dawn", "a chess tournament", "a storm", "a market"]

def one(i, out):
    body = {"model": a.model, "prompt": f"Write a short story about {TOPICS[i % len(TOPICS)]}.\n",
            "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(a.base_url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=600) as r:
        v = json.load(r)
    out[i] = (v["usage"]["completion_tokens"], time.time() - t0)

def run(n):
    out = [None] * n
    t0 = time.time()
    ts = [threading.Thread(target=one, args=(i, out)) for i in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.time() - t0
    toks = sum(o[0] for o in out)
    return toks, wall

run(1)  # warm up
toks, wall = run(1)
print(f"1 stream: {toks} tokens in {wall:.2f}s = {toks / wall:.1f} tok/s (incl. prefill)")
toks, wall = run(a.concurrency)
print(f"{a.concurrency} streams: {toks} tokens in {wall:.2f}s = {toks / wall:.1f} output tok/s")
