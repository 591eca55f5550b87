"""Lesson 06: generating text, with and without the KV cache.

What to look at:
1. ``model(idx)`` gives logits for EVERY position; generation only needs the last row.
2. Without a cache, step t re-runs the model over all t tokens seen so far.
3. With a ``KVCache`` the first call (the "prefill") stores every layer's keys and values in a
   preallocated buffer ``(B, nh, n_positions, hs)``; each later step feeds ONE token and reads
   the earlier keys/values from the buffer. Watch ``cache.length`` grow by one per step.
4. Both give the same greedy text (the assert), the cached one is faster (the table: the
   median of 5 runs each, since a single timing on a busy machine says little).

Run:  python demos/06_generation_kv_cache.py
"""

import statistics
import time

import torch
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

import torchlens_edu as tle
from torchlens_edu.models import KVCache
from torchlens_edu.models.offline import load_best_available

console = Console(highlight=False, soft_wrap=True)
model, tok, notice = load_best_available(device="cpu")
if notice:
    console.print(f"[dim]{notice}[/dim]")
cfg = model.config
prompt = "Mr. Darcy said that"
idx = torch.tensor([tok.encode(prompt)])  # (B=1, T)

console.print(Rule("1. one forward pass: logits for every position"))
with torch.no_grad():
    logits = model(idx)  # (B, T, V)
dims = {"B": 1, "T": idx.shape[1], "V": cfg.vocab_size}
console.print("logits:", tle.describe(logits, dims=dims))
next_id = int(logits[0, -1].argmax())
console.print(f"the most likely next token after {prompt!r} is {tok.decode([next_id])!r}")

console.print(Rule("2-3. the KV cache by hand: prefill, then one token per step"))
cache = KVCache(cfg, batch_size=1, device=idx.device, dtype=logits.dtype)
kv_dims = {"B": 1, "nh": cfg.n_head, "ctx": cfg.n_positions, "hs": cfg.head_size}
console.print("layer-0 key buffer:", tle.describe(cache.keys[0], dims=kv_dims, stats=False))
ids = idx
with torch.no_grad():
    feed = idx  # the whole prompt first
    for step in range(6):
        logits = model(feed, cache)  # (B, T_feed, V)
        feed = logits[:, -1:].argmax(-1)  # (B, 1): greedy
        ids = torch.cat([ids, feed], dim=1)
        console.print(f"step {step}: fed {logits.shape[1]:2d} token(s), cache.length = "
                      f"{cache.length:2d}, next {tok.decode(feed[0].tolist())!r}")
console.print(f"text so far: {tok.decode(ids[0].tolist())!r}")

console.print(Rule("4. same text, less work"))
n_new, runs = 40, 5
speeds: dict[bool, list[float]] = {False: [], True: []}  # tokens/s of each run
outputs = {}
for _ in range(runs):  # alternating, so that a busy moment slows both alike
    for use_cache in (False, True):
        start = time.perf_counter()
        outputs[use_cache] = model.generate(idx, n_new, temperature=0, use_cache=use_cache)
        speeds[use_cache].append(n_new / (time.perf_counter() - start))
assert torch.equal(outputs[False], outputs[True]), "cache and no-cache must agree"
# one run on a busy machine can read 6 tokens/s where the next reads 99: the median of several
# runs is the number to trust, and the range shows how noisy they were
table = Table("generate()", f"tokens/s (median of {runs})", "range", "work per step")
for use_cache, work in ((False, "whole sequence again"), (True, "one new token")):
    table.add_row(f"use_cache={use_cache}", f"{statistics.median(speeds[use_cache]):.0f}",
                  f"{min(speeds[use_cache]):.0f}-{max(speeds[use_cache]):.0f}", work)
console.print(table)
speedup = statistics.median(speeds[True]) / statistics.median(speeds[False])
console.print(f"the cache is {speedup:.1f}x faster here (medians)")
console.print(tok.decode(outputs[True][0].tolist()))
