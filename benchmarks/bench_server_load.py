"""Load and memory of the A1111 HTTP API server: rounds of concurrent clients, the server's RSS after each round.

The server (ldm_app.a1111 over ldm_app.serving, uvicorn on 127.0.0.1) runs in a child process started by this
script (`--serve`), so its resident memory (psutil) is its own, not the clients'. Each round, `--clients` threads
each send `--requests` txt2img requests one after another (plain HTTP, A1111's JSON), on the bundled default model
(64x64) unless `--model` names a model folder; every answer must be HTTP 200 with one image. After each round the
server's RSS is read. Round 1 includes loading the model and the allocators' warm-up, so growth is measured from
round 2 to the last: a ratio near 1.0 means no memory grows with the number of requests served (a leak of images,
jobs or futures would show here).

Writes `server_load.json` and `README.md` under `--out` (default docs/server_load).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_server_load.py --rounds 6 --clients 8 --requests 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm_app.errors import UserError, run_cli  # noqa: E402

PROMPT = "a red circle and a blue square on a gray background"
READY = "listening on port "


# ---- the server (child process) ----------------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Run the API server until stdin closes (the parent ends it so), on a socket bound here."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from ldm_app.a1111 import api_router
    from ldm_app.serving import GenerationService, ServerConfig

    torch.set_num_threads(args.threads)
    models_dir = model = None
    if args.model:
        models_dir, model = str(Path(args.model).resolve().parent), Path(args.model).resolve().name
    service = GenerationService(ServerConfig(models_dir=models_dir, model=model, outputs_dir=args.outputs,
                                             max_queue=args.clients))  # fmt: skip
    app = FastAPI()
    app.include_router(api_router(service))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    print(READY + str(sock.getsockname()[1]), flush=True)
    sys.stdout = open(os.devnull, "w")  # generate.py's per-job lines: nobody reads this pipe any more
    sys.stdin.read()  # until the parent closes it
    server.should_exit = True
    thread.join(30)
    service.close()


# ---- the clients (parent) ----------------------------------------------------------------------------------------


def one_round(port: int, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/sdapi/v1", timeout=600) as http:
            for k in range(args.requests):
                payload = {"prompt": PROMPT, "seed": (round_no * 1000 + index) * 100 + k}
                if args.steps:
                    payload["steps"] = args.steps
                start = time.perf_counter()
                try:
                    response = http.post("/txt2img", json=payload)
                    ok = response.status_code == 200 and len(response.json()["images"]) == 1
                    status = response.status_code
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    ok, status = False, 0
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                with lock:
                    statuses.append(status)
                    if ok:
                        latencies.append(time.perf_counter() - start)
                    elif status:
                        failures.append(f"HTTP {status}: {response.text[:200]}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "requests": len(statuses),
        "answered_200": len(latencies),
        "failures": failures[:5],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of load (growth is measured from round 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads per round")
    parser.add_argument("--requests", type=int, default=5, help="requests per client per round, one after another")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's stored ones)")
    parser.add_argument("--model", default=None, help="a model folder (default: the bundled default model)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch intra-op threads")
    parser.add_argument("--out", default="docs/server_load", help="folder for server_load.json and README.md")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--outputs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.clients < 1 or args.requests < 1 or args.threads < 1:
        raise UserError("--rounds must be >= 2 and --clients, --requests, --threads >= 1")
    if args.serve:
        return serve(args)

    import psutil

    outputs = tempfile.mkdtemp(prefix="bench_server_load_")
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--outputs", outputs,
               "--clients", str(args.clients), "--threads", str(args.threads)]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    log = Path(outputs) / "server.log"  # the server's stderr (progress bars, warnings, errors)
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    try:
        line = child.stdout.readline()
        if not line.startswith(READY):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise UserError(f"the server did not start (exit status {child.poll()}): {' '.join(tail)}")
        port = int(line[len(READY):])
        server = psutil.Process(child.pid)
        rss_start = server.memory_info().rss
        rounds = []
        for r in range(1, args.rounds + 1):
            result = one_round(port, args, r)
            result["round"] = r
            result["rss_mib"] = round(server.memory_info().rss / 2**20, 1)
            rounds.append(result)
            print(f"round {r}: {result['answered_200']}/{result['requests']} answered 200, {result['wall_s']} s, "
                  f"{result['requests_per_s']} req/s, RSS {result['rss_mib']} MiB", flush=True)  # fmt: skip
    finally:
        child.stdin.close()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
        shutil.rmtree(outputs, ignore_errors=True)

    growth = rounds[-1]["rss_mib"] / rounds[1]["rss_mib"]
    served_after_round2 = sum(r["answered_200"] for r in rounds[2:])
    per_request_kib = (rounds[-1]["rss_mib"] - rounds[1]["rss_mib"]) * 1024 / max(1, served_after_round2)
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model": args.model or "bundled default model (ldm_app/assets/default_model, 64x64)",
        "steps": args.steps or "the model's stored default",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "server_torch_threads": args.threads,
        "rss_after_start_mib": round(rss_start / 2**20, 1),
        "rounds": rounds,
        "all_answered_200": all(r["answered_200"] == r["requests"] == args.clients * args.requests for r in rounds),
        "rss_growth_round2_to_last": round(growth, 4),
        "rss_growth_per_request_kib": round(per_request_kib, 1),
    }
    print_table(summary)
    write(summary, Path(args.out), argv if argv is not None else sys.argv[1:])


def table(summary: dict[str, Any]) -> list[str]:
    rows = ["| round | requests | answered 200 | wall s | requests/s | median latency s | max latency s | RSS MiB |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["rounds"]:
        rows.append(f"| {r['round']} | {r['requests']} | {r['answered_200']} | {r['wall_s']} | {r['requests_per_s']} "
                    f"| {r['latency_median_s']} | {r['latency_max_s']} | {r['rss_mib']} |")  # fmt: skip
    return rows


def print_table(summary: dict[str, Any]) -> None:
    print(f"server RSS after start (no model loaded yet): {summary['rss_after_start_mib']} MiB")
    print("\n".join(table(summary)))
    print(f"RSS growth, round 2 -> round {len(summary['rounds'])}: x{summary['rss_growth_round2_to_last']:.4f} "
          f"({summary['rss_growth_per_request_kib']} KiB per request); every request answered 200: "
          f"{summary['all_answered_200']}")


def write(summary: dict[str, Any], out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "server_load.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    rounds = summary["rounds"]
    total = sum(r["requests"] for r in rounds)
    text = [
        "# A1111 API server under load: requests answered and memory (issue 18)",
        "",
        "`benchmarks/bench_server_load.py`: the A1111 HTTP API (`ldm_app.a1111` over `ldm_app.serving`, uvicorn on "
        "127.0.0.1) in a child process; each round, "
        f"{summary['clients']} client threads send {summary['requests_per_client']} txt2img requests each, one after "
        "another (so up to "
        f"{summary['clients']} jobs wait in the server's queue at once); the server's RSS (psutil) is read after "
        "each round. Round 1 includes loading the model, so growth is measured from round 2 to the last.",
        "",
        "```bash",
        "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_server_load.py " + " ".join(argv),
        "```",
        "",
        f"{summary['date']}, {summary['machine']} (shared with other jobs), model: {summary['model']}, steps: "
        f"{summary['steps']}, server torch threads: {summary['server_torch_threads']}. RSS after start, before the "
        f"model loads: {summary['rss_after_start_mib']} MiB.",
        "",
        *table(summary),
        "",
        f"{total} requests, every one answered 200 with an image: {summary['all_answered_200']}. RSS growth from round "
        f"2 to round {len(rounds)}: x{summary['rss_growth_round2_to_last']:.4f} "
        f"({rounds[1]['rss_mib']} -> {rounds[-1]['rss_mib']} MiB, {summary['rss_growth_per_request_kib']} KiB per "
        "request served after round 2).",
        "",
    ]
    (out / "README.md").write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {out / 'server_load.json'} and {out / 'README.md'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
