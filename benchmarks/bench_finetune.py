"""LoRA fine-tuning throughput (Ray Train vs in-process) and bulk ranking throughput (likelihood vs greedy vs
beam search).

1. Bootstraps a small base model on a toy task (``model/toy.py``: --clusters clusters, next = f(c1, c2)).
2. Fine-tunes the same LoRA config on the same examples twice: in this process (``run_inline``) and through
   Ray Train with one worker (``run_ray``). Reports examples/s and tokens/s
   - steady state: the median epoch's time (no start-up), and
   - including start-up: over the whole executor call (for Ray: ``ray.init`` + TorchTrainer start-up +
     worker model load + training + checkpoint), and the overhead ratios inline/Ray.
3. Ranks --rank-prompts prompts with the tuned adapter: likelihood ranking (``rank_clusters``, top-5, one
   forward pass per batch), free greedy generation (``generate_names``) and beam search of width 5
   (``beam_clusters``), in prompts/s (best of --repeats), with HR@1/HR@5 and the exact-match rate for
   context; the likelihood ranking again with the adapter merged into the base.
Also reports tokens per CPU-second, which a busy shared machine distorts far less than wall-clock rates.

Runs on CPU (2 cores) in a few minutes with the defaults; ``--device cuda`` puts ranking on a GPU.

    .venv/bin/python benchmarks/bench_finetune.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=64, help="toy catalogue size (3..240)")
    ap.add_argument("--size", default="small", help="base model size: tiny|small|medium")
    ap.add_argument("--base-examples", type=int, default=4000, help="triples the base is bootstrapped on")
    ap.add_argument("--base-epochs", type=int, default=1)
    ap.add_argument("--examples", type=int, default=3000, help="fine-tuning examples")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--rank-prompts", type=int, default=2000, help="prompts for the likelihood and greedy runs")
    ap.add_argument("--beam-prompts", type=int, default=300, help="prompts for the beam-search run")
    ap.add_argument("--rank-batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="ranking runs per method; the fastest counts")
    ap.add_argument("--evidence-window", type=int, default=30000, help="triples the (dense) evidence is counted over")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (inline) and CPUs per Ray worker; use 1 on a machine shared with other jobs, where "
        "spinning OpenMP threads waste most of the CPU",
    )
    ap.add_argument("--skip-ray", action="store_true", help="only the in-process fine-tune")
    ap.add_argument("--device", default="cpu", help="device for the ranking runs")
    ap.add_argument("--workdir", default=None, help="default: a fresh temp dir")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from recupdate_workloads.model.bootstrap import bootstrap, load_base
    from recupdate_workloads.model.examples import build_examples
    from recupdate_workloads.model.generate import (
        beam_clusters,
        exact_match_rate,
        generate_names,
        rank_clusters,
    )
    from recupdate_workloads.model.prompt import render
    from recupdate_workloads.model.toy import hit_rate, rule_a, rule_shift, toy_catalogue, toy_evidence, toy_triples
    from recupdate_workloads.model.train_loop import ensure_ray, load_adapter, run_inline, run_ray

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="recupdate-bench-ft-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"args": vars(args), "load_average_start": _load(), "torch_threads": args.threads}
    cat = toy_catalogue(args.clusters)

    # 1. base
    t0 = time.perf_counter()
    # The base learnt an old rule (c2 + 1); evidence is counted over a dense window so prompts carry it.
    old_window = toy_triples(cat, args.evidence_window, rule=rule_shift(1), seed=1, noise=0.2)
    base_triples = old_window.select(np.arange(min(args.base_examples, len(old_window))))
    base = bootstrap(
        cat, base_triples, toy_evidence(old_window), work / "base", size=args.size, epochs=args.base_epochs
    )
    meta = json.loads((base / "recupdate_bootstrap.json").read_text())
    out["bootstrap"] = {
        "seconds": time.perf_counter() - t0,
        "parameters": meta["parameters"],
        "examples": meta["examples"],
        "tokens_per_second": meta["tokens_per_second"],
    }
    print(
        f"bootstrap: {meta['parameters']:,} params, {meta['examples']} examples x {args.base_epochs} epochs, "
        f"{out['bootstrap']['seconds']:.1f} s, {meta['tokens_per_second']:,.0f} tokens/s"
    )

    # 2. fine-tune: same config, inline vs Ray
    # The world moved to rule_a: fine-tune on recent rule_a triples, each with the recent evidence.
    window = toy_triples(cat, args.evidence_window, rule=rule_a, seed=2, noise=0.2)
    evidence = toy_evidence(window)
    train = window.select(np.arange(min(args.examples, len(window))))
    examples = build_examples(cat, train, evidence, with_evidence=True, evidence_dropout=0.3, seed=0)
    config = {
        "base_model": str(base),
        "examples": examples.to_records(),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": 5e-3,
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r},
        "num_threads": args.threads,
        "seed": 0,
    }

    def figures(name: str, m: dict[str, Any]) -> dict[str, Any]:
        epochs = m["epoch_seconds"]
        typical = float(np.median(epochs))  # the median epoch: robust to a neighbour's burst on a shared box
        per_epoch_examples = m["examples"] / len(epochs)
        per_epoch_tokens = m["tokens"] / len(epochs)
        f = {
            "examples": m["examples"],
            "tokens": m["tokens"],
            "train_loss": m["train_loss"],
            "epoch_seconds": epochs,
            "steady_examples_per_s": per_epoch_examples / typical,
            "steady_tokens_per_s": per_epoch_tokens / typical,
            "train_examples_per_s": m["examples"] / sum(epochs),
            "wall_seconds": m["wall_seconds"],
            "wall_examples_per_s": m["examples"] / m["wall_seconds"],
            "wall_tokens_per_s": m["tokens"] / m["wall_seconds"],
            "setup_seconds": m["setup_seconds"],
            "cpu_seconds": m["cpu_seconds"],
            # CPU time is what contention on a shared machine distorts least
            "tokens_per_cpu_s": m["tokens"] / m["cpu_seconds"] if m["cpu_seconds"] else None,
        }
        print(
            f"{name:>7}: steady {f['steady_examples_per_s']:8.1f} ex/s {f['steady_tokens_per_s']:10,.0f} tok/s | "
            f"incl. start-up {f['wall_examples_per_s']:8.1f} ex/s {f['wall_tokens_per_s']:10,.0f} tok/s | "
            f"wall {f['wall_seconds']:6.1f} s, epochs {', '.join(f'{e:.1f}' for e in epochs)} s, "
            f"worker setup {f['setup_seconds']:.1f} s, loss {f['train_loss']:.3f}, "
            f"{f['tokens_per_cpu_s'] or 0:,.0f} tok/CPU-s"
        )
        return f

    inline = run_inline({**config, "output_dir": str(work / "adapter_inline")})
    out["inline"] = figures("inline", inline.metrics)
    adapter_dir = inline.adapter_dir
    if not args.skip_ray:
        t0 = time.perf_counter()
        ensure_ray(num_cpus=os.cpu_count())
        ray_init = time.perf_counter() - t0
        ray_res = run_ray(
            {**config, "output_dir": str(work / "adapter_ray")},
            workers=1,
            cpus_per_worker=args.threads,
            storage_path=work / "ray_results",
        )
        ray_res.metrics["wall_seconds"] += ray_init  # start-up includes ray.init
        out["ray"] = figures("ray", ray_res.metrics)
        out["ray"]["ray_init_seconds"] = ray_init
        out["overhead"] = {
            "steady_ratio": out["inline"]["steady_examples_per_s"] / out["ray"]["steady_examples_per_s"],
            "with_startup_ratio": out["inline"]["wall_examples_per_s"] / out["ray"]["wall_examples_per_s"],
            "startup_seconds_ray_minus_inline": (out["ray"]["wall_seconds"] - sum(out["ray"]["epoch_seconds"]))
            - (out["inline"]["wall_seconds"] - sum(out["inline"]["epoch_seconds"])),
        }
        o = out["overhead"]
        print(
            f"overhead inline/ray: steady x{o['steady_ratio']:.2f}, including start-up x{o['with_startup_ratio']:.2f} "
            f"(ray.init {ray_init:.1f} s; extra start-up {o['startup_seconds_ray_minus_inline']:.1f} s)"
        )
        import ray

        ray.shutdown()

    # 3. bulk ranking with the tuned adapter
    base_model, tok = load_base(base, device=args.device)
    model = load_adapter(base_model, adapter_dir)
    test = toy_triples(cat, args.rank_prompts, rule=rule_a, seed=99)
    prompts = [
        render(cat, int(a), int(b), evidence.get((int(a), int(b))), True) for a, b in zip(test.c1, test.c2, strict=True)
    ]
    rank_out: dict[str, Any] = {}

    def timed(name: str, n: int, fn: Any) -> Any:
        fn(min(n, 16))  # warm-up
        best, res = float("inf"), None
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            res = fn(n)
            best = min(best, time.perf_counter() - t)
        rank_out[name] = {"prompts": n, "seconds": best, "prompts_per_s": n / best}
        return res

    ids, _ = timed(
        "likelihood_top5",
        len(prompts),
        lambda n: rank_clusters(model, tok, cat, prompts[:n], top_n=5, batch_size=args.rank_batch_size),
    )
    rank_out["likelihood_top5"].update(hr1=hit_rate(ids, test.c_next, 1), hr5=hit_rate(ids, test.c_next, 5))
    _, gen = timed(
        "greedy", len(prompts), lambda n: generate_names(model, tok, cat, prompts[:n], batch_size=args.rank_batch_size)
    )
    rank_out["greedy"].update(exact_match=exact_match_rate(gen), hr1=float(np.mean(gen == test.c_next[: len(gen)])))
    nb = min(args.beam_prompts, len(prompts))
    beams = timed(
        "beam5",
        nb,
        lambda n: beam_clusters(
            model, tok, cat, prompts[:n], num_beams=5, batch_size=max(1, args.rank_batch_size // 5)
        ),
    )
    rank_out["beam5"].update(
        hr1=hit_rate(beams, test.c_next[:nb], 1),
        hr5=hit_rate(beams, test.c_next[:nb], 5),
        valid_share=float((beams >= 0).mean()),
    )
    merged = load_adapter(load_base(base, device=args.device)[0], adapter_dir, merge=True)
    timed(
        "likelihood_top5_merged",
        len(prompts),
        lambda n: rank_clusters(merged, tok, cat, prompts[:n], top_n=5, batch_size=args.rank_batch_size),
    )
    out["ranking"] = rank_out
    for name, r in rank_out.items():
        extra = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k not in ("prompts", "seconds", "prompts_per_s"))
        print(f"{name:>24}: {r['prompts_per_s']:9.1f} prompts/s ({r['prompts']} in {r['seconds']:.2f} s) {extra}")
    lk = rank_out["likelihood_top5"]["prompts_per_s"]
    print(
        f"likelihood top-5 vs beam-5: x{lk / rank_out['beam5']['prompts_per_s']:.1f} faster; "
        f"vs greedy top-1: x{lk / rank_out['greedy']['prompts_per_s']:.1f}"
    )
    out["load_average_end"] = _load()
    print(f"load average: start {out['load_average_start']}, end {out['load_average_end']} (2-core machine)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
