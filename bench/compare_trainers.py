"""Training throughput on a real model against the trainers users would otherwise run, in one run.

    python bench/compare_trainers.py --model smollm2-135m --task e2e --ranks 2 --rounds 3

Each round launches every contender of bench/trainer_peers.py once, in its own process (2 ranks: the
``deepspeed`` launcher, or ``torchrun`` with ``--launcher torchrun``; the plain loop under ``torchrun``),
in the same order; rounds repeat so that drifts of a shared machine hit every contender alike. Printed
per contender: useful (target) tokens/s and real tokens/s (median over rounds), FLOP utilisation against
the best fp32 matmul this script measures with the same threads per rank, peak RSS per rank, and the
ratios of ours to each peer (median over rounds of the per-round ratio, with its range). Ours' three
contenders alternate in one process in the timed rounds; after the rounds each runs once more alone
(untimed) for its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from contenders import OURS  # bench/ is this script's directory, first on sys.path
from harness import flops_per_real_token, matmul_peak_flops

from ds_loradrop.training.distributed import free_port

CONTENDERS = ("peer_loop", "hf_trainer", "sft_trainer", "ours")  # ours also measures ours_loradrop
PEERS = ("peer_loop", "hf_trainer", "sft_trainer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="e2e")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--ranks", type=int, default=2, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps: one epoch over the rows")
    parser.add_argument("--warmup_epochs", type=int, default=1, help="untimed epochs over the same rows")
    parser.add_argument("--global_batch_size", type=int, default=8)
    parser.add_argument("--ds_config", default=os.path.join(REPO_ROOT, "ds_configs", "zero2.json"))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--launcher",
        default="deepspeed",
        choices=("deepspeed", "torchrun"),
        help="what starts the DeepSpeed contenders' 2 ranks (the plain PEFT loop always runs under "
        "torchrun); torchrun starts ~10 s sooner on a CPU machine: the deepspeed runner and its launch.py "
        "each import DeepSpeed first",
    )
    parser.add_argument(
        "--no_memory_alone",
        dest="memory_alone",
        action="store_false",
        help="skip the extra runs of each of ours alone (its peak memory as a run of its own: the timed "
        "rounds alternate all three in one process)",
    )
    parser.add_argument(
        "--python",
        default=None,
        help="the interpreter of the contenders' rank processes (default: this one); the launcher runs it "
        "as the program (torchrun --no-python, deepspeed --no_python --no_local_rank)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup_epochs < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup_epochs >= 0")
    return args


def launch_command(args, contender: str, out: str, alone: str | None = None) -> list[str]:
    script = os.path.join(REPO_ROOT, "bench", "trainer_peers.py")
    flags = [
        "--contender", contender, "--model", args.model, "--task", args.task, "--ds_config", args.ds_config,
        "--global_batch_size", str(args.global_batch_size), "--steps", str(args.steps),
        "--warmup_epochs", str(args.warmup_epochs), "--json", out,
        *(["--data_dir", args.data_dir] if args.data_dir else []),
        *(["--alone", alone] if alone else []),
    ]  # fmt: skip
    if args.ranks == 1:
        return [args.python or sys.executable, script, *flags]
    port = str(free_port())
    if contender == "peer_loop" or args.launcher == "torchrun":  # peer_loop: DDP without DeepSpeed
        python = ["--no-python", args.python] if args.python else []
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            *python, script, *flags,
        ]  # fmt: skip
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    python = ["--no_python", "--no_local_rank", args.python] if args.python else []  # rank from LOCAL_RANK
    return [deepspeed, "--num_gpus", "2", "--master_port", port, *python, script, *flags]


def environment(ranks: int) -> dict:
    threads = str(max(1, (os.cpu_count() or 2) // ranks))
    return {**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}


def launch_one(args, env: dict, contender: str, out: str, what: str, alone: str | None = None) -> dict:
    """One contender's process; its result file (exits with an ``error:`` line when it failed)."""
    done = subprocess.run(
        launch_command(args, contender, out, alone),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"error: {contender} failed in {what}:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(out) as handle:
        return json.load(handle)


def alone_peak_rss(args, env: dict, directory: str) -> dict:
    """Each of ours in a process of its own: name -> peak RSS bytes per rank (not timed)."""
    peaks = {}
    for name in OURS:
        result = launch_one(
            args, env, "ours", os.path.join(directory, f"{name}-alone.json"), f"{name} alone", name
        )
        peaks[name] = result["peak_rss_bytes_per_rank"]
        print(f"{name} alone (memory) done", file=sys.stderr, flush=True)
    return peaks


def run_round(args, env: dict, directory: str, round_index: int) -> dict:
    measured = {}
    for contender in args.contenders:
        out = os.path.join(directory, f"{contender}-{round_index}.json")
        result = launch_one(args, env, contender, out, f"round {round_index}")
        for name, value in result.items():
            if isinstance(value, dict):
                measured[name] = {**value, "peak_rss_bytes_per_rank": result["peak_rss_bytes_per_rank"]}
        print(f"round {round_index}: {contender} done", file=sys.stderr, flush=True)
    return measured


def summarise(
    rounds: list[dict], peak_flops: float, per_token: float, ranks: int, alone_rss: dict | None = None
) -> dict:
    """Medians over rounds; ours' peak RSS from its runs alone where ``alone_rss`` has them (the rounds'
    shared process holds three runs)."""
    alone_rss = alone_rss or {}
    names = [n for n in (*PEERS, *OURS) if all(n in r for r in rounds)]
    summary = {}
    for name in names:
        useful = [r[name]["useful_tokens"] / r[name]["seconds"] for r in rounds]
        real = [r[name]["real_tokens"] / r[name]["seconds"] for r in rounds]
        summary[name] = {
            "useful_tokens_per_second": statistics.median(useful),
            "real_tokens_per_second": statistics.median(real),
            "flop_utilization": statistics.median(real) * per_token / (peak_flops * ranks),
            "peak_rss_gib_per_rank": [
                (
                    alone_rss[name][k]
                    if name in alone_rss
                    else max(r[name]["peak_rss_bytes_per_rank"][k] for r in rounds)
                )
                / 2**30
                for k in range(ranks)
            ],
            "peak_rss_measured": "alone" if name in alone_rss else "in the rounds",
            "per_round_useful_tokens_per_second": useful,
        }
    ratios = {}
    for ours in (n for n in OURS if n in summary):
        for peer in (n for n in PEERS if n in summary):
            per_round = [
                a / b
                for a, b in zip(
                    summary[ours]["per_round_useful_tokens_per_second"],
                    summary[peer]["per_round_useful_tokens_per_second"],
                    strict=True,
                )
            ]
            ratios[f"{ours}/{peer}"] = {"median": statistics.median(per_round), "per_round": per_round}
    return {"contenders": summary, "ratios": ratios, "timed_tokens": timed_tokens(rounds, names)}


def timed_tokens(rounds: list[dict], names: list[str]) -> dict:
    """The (useful, real) tokens each contender timed per round; every contender times the same epoch of
    the same rows, so they must agree (``same``): a ratio of tokens/s is then a ratio of seconds."""
    counts = {
        name: sorted({(r[name]["useful_tokens"], r[name]["real_tokens"]) for r in rounds}) for name in names
    }
    return {"same": len({tuple(c) for c in counts.values()}) <= 1, "per_contender": counts}


def report(args, summary: dict, peak_flops: float) -> str:
    lines = [
        (
            f"{args.model}, task {args.task}, {args.ranks} rank(s), global batch {args.global_batch_size}, "
            f"{args.steps} timed steps (one epoch of {args.steps * args.global_batch_size} rows) after "
            f"{args.warmup_epochs} untimed epoch(s) over them, {args.rounds} round(s), fp32, "
            f"started by {args.launcher}, "
            f"matmul peak {peak_flops / 1e9:.0f} GFLOP/s per rank"
        ),
        "",
        "| contender | useful tokens/s | real tokens/s | FLOP utilisation | peak RSS per rank (GiB) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, value in summary["contenders"].items():
        rss = ", ".join(f"{v:.2f}" for v in value["peak_rss_gib_per_rank"])
        if name in OURS and value["peak_rss_measured"] != "alone":
            rss += " (three runs in one process)"
        lines.append(
            f"| {name} | {value['useful_tokens_per_second']:.0f} | {value['real_tokens_per_second']:.0f} | "
            f"{100 * value['flop_utilization']:.1f}% | {rss} |"
        )
    tokens = summary["timed_tokens"]
    if tokens["same"]:
        useful, real = next(iter(tokens["per_contender"].values()), [(0, 0)])[0]
        lines += ["", f"every contender timed the same rows: {useful} useful / {real} real tokens per round"]
    else:
        lines += ["", f"WARNING: the contenders timed different tokens: {tokens['per_contender']}"]
    lines.append("")
    for name, value in summary["ratios"].items():
        per_round = ", ".join(f"{v:.2f}" for v in value["per_round"])
        lines.append(f"{name} (useful tokens/s): {value['median']:.2f}x (rounds: {per_round})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    from harness import model_path

    # A preset is built here, once; every contender then loads the same checkpoint directory.
    args.model = model_path(args.model)
    env = environment(args.ranks)
    threads = int(env["OMP_NUM_THREADS"])
    peak_before = matmul_peak_flops(threads)
    with tempfile.TemporaryDirectory() as directory:
        rounds = [run_round(args, env, directory, k) for k in range(args.rounds)]
        measure_alone = args.memory_alone and "ours" in args.contenders
        alone = alone_peak_rss(args, env, directory) if measure_alone else {}
    peak = max(peak_before, matmul_peak_flops(threads))
    per_token = flops_per_real_token(args.model)
    summary = summarise(rounds, peak, per_token, args.ranks, alone)
    summary["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    summary["matmul_peak_gflops_per_rank"] = peak / 1e9
    print(report(args, summary, peak), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
