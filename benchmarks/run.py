"""Benchmarks: torchlens_edu side by side with the tools a learner would otherwise use.

    python benchmarks/run.py            # full run: GPT-2 small, 1x128 and 4x256 tokens, 7 reps
    python benchmarks/run.py --quick    # smoke run (< 3 min): a tiny GPT-2, 1x32 tokens, 3 reps

Each group (see ``groups.py``) runs in a fresh process, times ours and the peer interleaved
(warm-up, then the median of the repetitions), and reports ratios: absolute times depend on the
machine, ratios much less. Results go to ``benchmarks/results.json`` and ``results.md`` (the
quick mode writes ``results-quick.*`` so that it never overwrites a full run).
Needs the ``bench`` extra: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a smoke run: every group and peer, on a model small enough for a busy CI machine
QUICK = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 2048, "shapes": ((1, 32),),
         "reps": 3, "warmup": 1, "new_tokens": 8, "describe_shape": (8192, 768)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under 3 minutes")
    parser.add_argument("--groups", default=None,
                        help="comma-separated subset of the groups (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="cpu, cuda, or all available (default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in the benchmark processes (default: "
                             "torch's choice); 1 gives steadier numbers on a busy machine")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the results files")
    parser.add_argument("--update", action="store_true",
                        help="keep the other groups' rows of the existing results file")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per contender (default 7, the median is kept)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one group
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)

    import torch  # after argparse: `--help` stays instant
    from groups import GROUPS, Setting
    from rich.progress import Progress

    names = args.groups.split(",") if args.groups else list(GROUPS)
    if unknown := [n for n in names if n not in GROUPS]:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    devices = ["cpu"] if args.device == "cpu" else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "all":
        devices.insert(0, "cpu")
    if not devices:
        parser.error("--device cuda: CUDA is not available here")
    base = Setting(**QUICK) if args.quick else Setting()
    if args.warmup is not None:
        base = dataclasses.replace(base, warmup=args.warmup)
    if args.reps is not None:
        base = dataclasses.replace(base, reps=args.reps)
    jobs = [(n, d) for d in devices for n in names if not (n == "meta" and d != "cpu")]

    machine = _machine(torch)
    machine["threads"] = args.threads or torch.get_num_threads()
    stem = args.out / ("results-quick" if args.quick else "results")
    kept: list[dict] = []
    if args.update and stem.with_suffix(".json").exists():
        kept = [r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]
                if r["group"] not in names and r["group"] != "leaks"]
    started = time.time()
    rows: list[dict] = []
    result: dict = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmarks", total=len(jobs))
        for name, device in jobs:
            progress.update(task, description=f"{name} ({device})")
            rows += _run_group(name, dataclasses.replace(base, device=device), args.threads)
            progress.advance(task)
            machine["load_average_after"] = _load()
            result = {"machine": machine, "quick": args.quick,
                      "setting": dataclasses.asdict(base) | {"device": devices},
                      "seconds": round(time.time() - started, 1),
                      "rows": _with_leaks(kept + rows, devices)}
            _write(stem, result)  # after every group: a cut-short run keeps what it measured
    print(markdown(result))
    return 0


def _with_leaks(rows: list[dict], devices: list[str]) -> list[dict]:
    """The rows, then one row that adds up the hooks every group left behind."""
    leaks = [leak for r in rows for leak in r.get("leaks", [])]
    total = {"group": "leaks", "name": "hooks left behind after all of it", "input": "",
             "device": ",".join(devices), "times_ms": {}, "spread": {},
             "metric": "hooks left", "value": len(leaks), "target": "== 0", "ok": not leaks,
             "note": "; ".join(leaks)}
    return [*rows, total]


def _write(stem: Path, result: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))


def _run_group(name: str, setting: object, threads: int | None) -> list[dict]:
    """One group in a fresh Python; its rows come back as JSON (an error becomes a row)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        job = json.dumps({"group": name, "setting": dataclasses.asdict(setting),
                          "threads": threads, "out": str(out)})
        proc = subprocess.run([sys.executable, str(HERE / "run.py"), "--worker", job],
                              capture_output=True, text=True, cwd=HERE)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return [{"group": name, "name": f"{name} failed", "input": "", "device": setting.device,
             "times_ms": {}, "spread": {}, "metric": "error", "value": float("nan"),
             "target": "", "ok": False, "note": " | ".join(tail)}]


def _worker(job_json: str) -> int:
    import warnings

    from groups import GROUPS, Leaks, Setting

    warnings.filterwarnings("ignore")  # the peers' deprecation chatter is not a result
    job = json.loads(job_json)
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])  # this benchmark process only
    setting = job["setting"]
    setting["shapes"] = tuple(tuple(s) for s in setting["shapes"])
    setting["describe_shape"] = tuple(setting["describe_shape"])
    leaks = Leaks()
    rows = GROUPS[job["group"]](Setting(**setting), leaks)
    if rows:
        rows[-1]["leaks"] = leaks.left()
    Path(job["out"]).write_text(json.dumps(rows))
    return 0


def _machine(torch: object) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import PackageNotFoundError, version

    peers = {}
    for package in ("transformers", "torchlens", "transformer-lens", "torchinfo",
                    "lovely-tensors"):
        try:
            peers[package] = version(package)
        except PackageNotFoundError:
            peers[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_before": _load(), "peers": peers,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def markdown(result: dict) -> str:
    """The results as a Markdown table, headline ratios first."""
    m = result["machine"]
    lines = [
        f"# torchlens_edu benchmarks{' (quick mode)' if result['quick'] else ''}",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']} · "
        f"{m['threads']} threads · python {m['python']}" + (f" · {m['cuda']}" if m["cuda"]
                                                              else ""),
        f"load average before {m['load_average_before']}, after {m['load_average_after']} "
        f"· {result['seconds']} s · median of {result['setting']['reps']} reps after "
        f"{result['setting']['warmup']} warm-up, contenders interleaved",
        "",
        "| comparison | input | device | median times (ms) | headline | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        times = ", ".join(f"{k} {v:.1f}" for k, v in r["times_ms"].items())
        met = {True: "yes", False: "**no**", None: ""}[r["ok"]]
        lines.append(f"| {r['name']} | {r['input']} | {r['device']} | {times} | "
                     f"{r['metric']} = {r['value']:.3g} | {r['target']} | {met} |")
    notes = [f"- {r['name']} ({r['input']}, {r['device']}): {r['note']}"
             for r in result["rows"] if r["note"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
