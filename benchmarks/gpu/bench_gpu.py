"""GPU throughput of the product's LoRA fine-tune and table scoring on a Qwen2-0.5B-shaped model, each against
plain PyTorch + PEFT on the same model in the same run. No Ray: the in-process (inline) executor.

The model is built from config (Qwen2-0.5B's shape: 24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, a
151,936-word vocabulary, tied embeddings; random weights, bfloat16, SDPA attention) and saved with
``save_pretrained``, with a byte-level BPE tokenizer trained on the catalogue (``model/standin.py``: every
cluster name is several tokens, as with a real tokenizer). Both sides then load that directory.

1. LoRA fine-tune, tokens/s (every token of every sequence, padding excluded):
   - product: ``train_loop.run_inline``, the fine-tune job's code path (base loaded bfloat16 with
     ``load_base``, LoRA on every linear layer, answer-only loss with logits at the answer positions only,
     length-bucketed batches, bfloat16 autocast, fused AdamW); two epochs, the second one timed;
   - baseline: the same model and LoRA config with PEFT and a plain torch loop: right-padded batches,
     ``model(input_ids, attention_mask, labels).loss.backward()`` (logits at every position), AdamW; warm-up
     steps, then the same number of timed steps.
   Reference: 54k tokens/s at batch 128 x 128 for the plain loop on an H200. Target: product >= 2x baseline.
2. Table scoring, prompts/s over many context pairs (each prompt with evidence lines, about as long as the
   training sequences):
   - product: ``Predictor.load`` (base + adapter, merged) and ``Predictor.rank`` (``rank_clusters``, top 10,
     the pair's own clusters excluded), what ``jobs/materialize.py`` runs: the multi-token path (a prompt pass,
     then one pass over the names' prefix tree on the prompt's KV cache);
   - baseline: forward-only next-token scoring of the same prompts with the same model: a plain forward with
     logits at every position, log-softmax of the last one, top 10.
   Also: the product's single-token path (the names added to the tokenizer as one token each) and the
   multi-token path it replaced (one row per candidate over a copied KV cache), for context.
   Reference: 3,270 prompts/s for forward-only scoring at 128 tokens on an H200. Target: product >= 1.5x.

    python benchmarks/gpu/bench_gpu.py                 # CUDA, full size, about 2 minutes on an H200
    python benchmarks/gpu/bench_gpu.py --smoke         # CPU, tiny model, seconds (tests/model runs it)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The repository's workloads package, when it is not installed (a GPU box with only the working tree).
_WORKLOADS = Path(__file__).resolve().parents[2] / "workloads"
if _WORKLOADS.is_dir() and str(_WORKLOADS) not in sys.path:
    sys.path.insert(0, str(_WORKLOADS))

REFERENCE = {"finetune_baseline_tokens_per_s": 54_000, "scoring_baseline_prompts_per_s": 3_270}
TARGETS = {"finetune_speedup": 2.0, "scoring_speedup": 1.5}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 32_768
    rope_theta: float = 1_000_000.0


QWEN2_0_5B = Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, max_positions=1024)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _phase(results: dict[str, Any], name: str, deadline: float, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one measurement; an error (an out-of-memory, say) is recorded and the others still run."""
    if time.perf_counter() > deadline:
        results[name] = {"skipped": "past --max-seconds"}
        print(f"[{name}] skipped: past --max-seconds", flush=True)
        return
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    results[name]["phase_seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] {json.dumps(results[name])}", flush=True)


def _evidence_maker(catalogue: Any, lines: int, seed: int) -> Callable[[int, int], Any]:
    """Evidence of exactly ``lines`` successors for a pair (random clusters and shares, some borrowed)."""
    import numpy as np

    from recupdate_workloads.data.types import PairEvidence, Successor

    rng = np.random.default_rng(seed)
    n = len(catalogue)

    def make(c1: int, c2: int) -> PairEvidence:
        others = np.array([c for c in range(n) if c not in (c1, c2)])
        picked = rng.choice(others, size=min(lines, len(others)), replace=False)
        shares = np.sort(rng.dirichlet(np.ones(len(picked) + 1))[: len(picked)])[::-1]
        succ = tuple(
            Successor(int(c), float(s), 1, float(s), bool(rng.random() < 0.2))
            for c, s in zip(picked, shares, strict=True)
        )
        return PairEvidence(c1=c1, c2=c2, support=len(succ), successors=succ)

    return make


def _pick_lines(catalogue: Any, tokenizer: Any, target_tokens: int) -> tuple[int, float]:
    """The number of evidence lines whose prompts (plus an answer) come closest to ``target_tokens``."""
    import numpy as np

    from recupdate_workloads.model.prompt import render

    n = len(catalogue)
    best = (1, float("inf"), 0.0)
    for lines in range(0, n - 1):
        make = _evidence_maker(catalogue, lines, seed=1)
        pairs = [(i % n, (i * 5 + 1) % n) for i in range(24) if i % n != (i * 5 + 1) % n]
        texts = [render(catalogue, a, b, make(a, b) if lines else None, True, top_r=max(1, lines)) for a, b in pairs]
        mean = float(np.mean([len(x) for x in tokenizer(texts)["input_ids"]])) + 4  # + an answer and EOS
        if abs(mean - target_tokens) < best[1]:
            best = (lines, abs(mean - target_tokens), mean)
        if mean > target_tokens:
            break
    return best[0], best[2]


def _build_base(out: Path, shape: Shape, tokenizer: Any, device: str, dtype: Any, seed: int) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    eot = tokenizer.eos_token_id
    cfg = Qwen2Config(
        vocab_size=max(shape.vocab, len(tokenizer)),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute for 0.5B on a CPU
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def _baseline_finetune(
    base: Path,
    encoded: Any,
    targets: list[str],
    args: argparse.Namespace,
    device: str,
    dtype: Any,
) -> dict[str, Any]:
    """Plain PEFT eager: the same model and LoRA config, a plain loop with the model's own loss."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets
        ),
    )
    fwd: Any = torch.compile(model, dynamic=True) if args.compile else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    pad = 0
    seqs, alens = encoded.sequences, encoded.answer_lens
    order = np.random.default_rng(args.seed).permutation(len(seqs))

    def batch(step: int) -> tuple[Any, Any, Any, int]:
        idx = [order[(step * args.batch_size + i) % len(seqs)] for i in range(args.batch_size)]
        t = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        labels = torch.full((len(idx), t), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            s = torch.as_tensor(seqs[i])
            ids[r, : len(s)], mask[r, : len(s)] = s, 1
            labels[r, len(s) - alens[i] : len(s)] = s[len(s) - alens[i] :]  # loss on the answer, as an SFT loop
        return ids.to(device), mask.to(device), labels.to(device), int(mask.sum())

    model.train()
    _reset_peak(device)
    tokens = 0
    t0 = 0.0
    for step in range(args.warmup_steps + args.train_steps):
        if step == args.warmup_steps:
            _sync(device)
            t0, tokens = time.perf_counter(), 0
        ids, mask, labels, n = batch(step)
        loss = fwd(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {
        "tokens_per_s": round(tokens / seconds, 1),
        "timed_steps": args.train_steps,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "final_loss": round(float(loss.detach()), 4),
        "peak_gib": _peak_gib(device),
    }
    del model, fwd, opt
    return out


def _product_finetune(
    base: Path, examples: Any, work: Path, args: argparse.Namespace, device: str
) -> tuple[dict[str, Any], str]:
    from recupdate_workloads.model.train_loop import run_inline

    _reset_peak(device)
    res = run_inline(
        {
            "base_model": str(base),
            "examples": examples.to_records(),
            "output_dir": str(work / "adapter"),
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},  # targets: every linear layer
            "lr": args.lr,
            "epochs": 2,  # the first warms up (kernels, allocator, compile); the second is timed
            "batch_size": args.batch_size,
            "device": device,
            "dtype": "auto",
            "compile": args.compile,
            "seed": args.seed,
        }
    )
    m = res.metrics
    per_epoch = m["tokens"] / 2
    return {
        "tokens_per_s": round(per_epoch / m["epoch_seconds"][-1], 1),
        "warmup_epoch_tokens_per_s": round(per_epoch / m["epoch_seconds"][0], 1),
        "steps_per_epoch": -(-m["examples"] // 2 // args.batch_size),
        "tokens_per_epoch": int(per_epoch),
        "epoch_seconds": [round(x, 3) for x in m["epoch_seconds"]],
        "train_loss": round(m["train_loss"], 4),
        "trainable_parameters": m["trainable_parameters"],
        "target_modules": m["lora"]["target_modules"],
        "peak_gib": _peak_gib(device),
    }, res.adapter_dir


def _best_rate(n: int, fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, float]:
    """(best items/s, its seconds) over ``repeats`` timed runs of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return n / best, best


def _scoring(
    base: Path,
    adapter: str | None,
    catalogue: Any,
    tok_single: Any,
    c1: Any,
    c2: Any,
    evidence: dict[Any, Any],
    args: argparse.Namespace,
    device: str,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from recupdate_workloads.model.generate import (
        _multi_token_logprobs_repeat,
        _trie,
        answer_token_ids,
        cluster_token_ids,
    )
    from recupdate_workloads.model.predictor import Predictor

    _reset_peak(device)
    pred = Predictor.load(str(base), adapter, catalogue, with_evidence=True, top_r=args.lines)
    pred.batch_size = args.score_batch
    model, tok = pred.model, pred.tokenizer
    assert cluster_token_ids(tok, catalogue) is None  # the multi-token path
    n = len(c1)
    step = pred.batch_size * 8  # what jobs/materialize.py hands Predictor.rank at a time

    def product(p: Predictor) -> Callable[[], Any]:
        def run() -> None:
            for s in range(0, n, step):
                p.rank(c1[s : s + step], c2[s : s + step], evidence, 10)

        return run

    def baseline() -> None:
        with torch.inference_mode():
            for s in range(0, n, args.score_batch):
                prompts = pred.prompts(c1[s : s + args.score_batch], c2[s : s + args.score_batch], evidence)
                enc = tok(prompts, padding=True, return_tensors="pt").to(device)  # left-padded
                logits = model(**enc).logits[:, -1].float()
                torch.topk(torch.log_softmax(logits, -1), 10, dim=-1).indices.cpu()

    warm = min(n, 2 * args.score_batch)
    Predictor(model, tok, catalogue, True, args.lines, args.score_batch).rank(c1[:warm], c2[:warm], evidence, 10)
    baseline()  # warm-up: kernels and the allocator for every batch shape
    prod_rate, prod_s = _best_rate(n, product(pred), args.repeats, device)
    base_rate, base_s = _best_rate(n, baseline, args.repeats, device)
    single = Predictor(model, tok_single, catalogue, True, args.lines, args.score_batch)
    assert cluster_token_ids(tok_single, catalogue) is not None
    single.rank(c1[:warm], c2[:warm], evidence, 10)
    single_rate, _ = _best_rate(n, product(single), args.repeats, device)
    m = min(n, args.previous_prompts)
    prompts = pred.prompts(c1[:m], c2[:m], evidence)
    cands = answer_token_ids(tok, catalogue)
    prev_rate, _ = _best_rate(
        m, lambda: _multi_token_logprobs_repeat(model, tok, prompts, cands, args.score_batch), 1, device
    )
    lengths = [len(x) for x in tok(prompts)["input_ids"]]
    return {
        "pairs": n,
        "attention": model.config._attn_implementation,
        "prompt_tokens_mean": round(float(np.mean(lengths)), 1),
        "answer_tokens_mean": round(float(np.mean([len(c) for c in cands])), 2),
        "trie_nodes": len(_trie(cands, tok.eos_token_id, torch.device("cpu")).tokens),
        "product_prompts_per_s": round(prod_rate, 1),
        "baseline_prompts_per_s": round(base_rate, 1),
        "single_token_prompts_per_s": round(single_rate, 1),
        "previous_multi_token_prompts_per_s": round(prev_rate, 1),
        "product_seconds": round(prod_s, 3),
        "baseline_seconds": round(base_s, 3),
        "peak_gib": _peak_gib(device),
    }


def _single_token_tokenizer(tokenizer: Any, catalogue: Any) -> Any:
    """A copy of ``tokenizer`` with every cluster's answer form (after its leading space) as one added token."""
    import copy

    from tokenizers import AddedToken

    from recupdate_workloads.model.prompt import ANSWER_PREFIX, all_answers

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([AddedToken(ANSWER_PREFIX + a, normalized=False, single_word=False) for a in all_answers(catalogue)])
    return tok


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, a few steps: checks the script")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both training loops (dynamic shapes)")
    ap.add_argument("--batch-size", type=int, default=None, help="training sequences per step (default 128)")
    ap.add_argument("--seq-len", type=int, default=None, help="mean tokens per sequence to aim at (default 128)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 20)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed baseline steps first (default 3)")
    ap.add_argument("--clusters", type=int, default=None, help="catalogue size (default 64)")
    ap.add_argument("--score-pairs", type=int, default=None, help="pairs scored (default 4032: every pair of 64)")
    ap.add_argument("--score-batch", type=int, default=128, help="prompts per scoring batch")
    ap.add_argument("--previous-prompts", type=int, default=None, help="prompts for the previous multi-token path")
    ap.add_argument("--repeats", type=int, default=2, help="timed scoring runs per method; the fastest counts")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-seconds", type=float, default=280.0, help="phases not started by then are skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="default: a fresh temp dir (the model is saved there)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    small = args.smoke
    defaults = {
        "batch_size": (8, 128),
        "seq_len": (48, 128),
        "train_steps": (2, 20),
        "warmup_steps": (1, 3),
        "clusters": (12, 64),
        "score_pairs": (40, 4032),
        "previous_prompts": (16, 512),
    }
    for k, (tiny, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if small else full)
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds

    import numpy as np
    import torch
    import transformers

    device = args.device or ("cpu" if small else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke (a tiny model on the CPU) or on a GPU machine")
    os.environ["RECUPDATE_DEVICE"] = device  # Predictor.load and the train loop follow it
    import peft

    from recupdate_workloads.data.synthetic import synthetic_catalogue
    from recupdate_workloads.model.examples import Examples
    from recupdate_workloads.model.hf import default_dtype, lora_target_modules
    from recupdate_workloads.model.prompt import answer_text, render
    from recupdate_workloads.model.standin import documents, train_tokenizer
    from recupdate_workloads.model.training import encode_examples

    dtype = default_dtype(device)
    shape = TINY if small else QWEN2_0_5B
    work = Path(args.workdir or tempfile.mkdtemp(prefix="recupdate-gpu-bench-"))
    base = work / "qwen2-shaped"
    catalogue = synthetic_catalogue(args.clusters)
    tokenizer = train_tokenizer(catalogue, documents(catalogue, 300 if small else 1500, args.seed), vocab_size=2048)
    params = _build_base(base, shape, tokenizer, device, dtype, args.seed)
    args.lines, seq_mean = _pick_lines(catalogue, tokenizer, args.seq_len)
    make = _evidence_maker(catalogue, args.lines, args.seed)
    rng = np.random.default_rng(args.seed)
    n = len(catalogue)
    n_train = args.batch_size * args.train_steps
    a = rng.integers(0, n, n_train)
    b = (a + rng.integers(1, n, n_train)) % n
    nxt = [int(rng.choice([c for c in range(n) if c not in (x, y)])) for x, y in zip(a, b, strict=True)]
    prompts = [
        render(catalogue, int(x), int(y), make(int(x), int(y)) if args.lines else None, True, top_r=max(1, args.lines))
        for x, y in zip(a, b, strict=True)
    ]
    examples = Examples(prompts, [answer_text(catalogue, c) for c in nxt])
    encoded = encode_examples(tokenizer, examples.prompts, examples.answers)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j][: args.score_pairs]
    c1 = np.array([p[0] for p in pairs], np.int32)
    c2 = np.array([p[1] for p in pairs], np.int32)
    evidence = {p: make(*p) for p in pairs}
    tok_single = _single_token_tokenizer(tokenizer, catalogue)
    setup = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "smoke": small,
        "compile": args.compile,
        "model": {**asdict(shape), "parameters": params, "tokenizer_vocab": len(tokenizer)},
        "clusters": n,
        "evidence_lines": args.lines,
        "batch_size": args.batch_size,
        "sequence_tokens_mean": round(encoded.n_tokens / len(encoded), 1),
        "lora_r": args.lora_r,
        "setup_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(f"[setup] {json.dumps(setup)} (aimed at {args.seq_len}, estimate {seq_mean:.0f})", flush=True)
    results: dict[str, Any] = {}
    adapter: list[str] = []

    def product_ft() -> dict[str, Any]:
        out, path = _product_finetune(base, examples, work, args, device)
        adapter.append(path)
        return out

    def baseline_ft() -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # the names of the linear layers, without loading weights
            shell = AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(base))
        return _baseline_finetune(base, encoded, lora_target_modules(shell, None), args, device, dtype)

    _phase(results, "finetune_product", deadline, product_ft)
    _phase(results, "finetune_baseline", deadline, baseline_ft)
    _phase(
        results,
        "scoring",
        deadline,
        lambda: _scoring(base, adapter[0] if adapter else None, catalogue, tok_single, c1, c2, evidence, args, device),
    )

    fp, fb, sc = results["finetune_product"], results["finetune_baseline"], results["scoring"]
    ft_x = fp["tokens_per_s"] / fb["tokens_per_s"] if "tokens_per_s" in fp and "tokens_per_s" in fb else None
    sc_x = sc["product_prompts_per_s"] / sc["baseline_prompts_per_s"] if "product_prompts_per_s" in sc else None
    single_x = sc["single_token_prompts_per_s"] / sc["baseline_prompts_per_s"] if sc_x is not None else None
    summary = {
        "finetune_speedup": round(ft_x, 3) if ft_x else None,
        "scoring_speedup": round(sc_x, 3) if sc_x else None,
        "scoring_speedup_single_token": round(single_x, 3) if single_x else None,
        "targets": TARGETS,
        "met": {
            "finetune": ft_x is not None and ft_x >= TARGETS["finetune_speedup"],
            "scoring": sc_x is not None and sc_x >= TARGETS["scoring_speedup"],
        },
        "reference": REFERENCE,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report = {"setup": setup, **results, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return report


if __name__ == "__main__":
    main()
