"""LoRA fine-tuning: one per-worker training loop, run in-process (``run_inline``) or on Ray Train
(``run_ray``, a ``TorchTrainer`` with N workers, DDP when N > 1).

The config (a plain dict, so it travels to Ray workers and comes from the policy spec) holds:

    base_model       path (or hub id) of the base causal LM + tokenizer            (required)
    examples         list of {"prompt", "answer"} records, or
    examples_path    a .jsonl / .parquet of them                                    (one of the two)
    output_dir       where the adapter ends up (adapter_model.safetensors, adapter_config.json,
                     metrics.json)                                                   (required)
    lora             {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": [...]}; target_modules empty or
                     "auto": every linear layer but the output head, whatever the architecture (model/hf.py)
    device           default: cuda when visible (the Ray Train worker's GPU on Ray), else cpu
    dtype            of the frozen base: "auto" (bfloat16 on a GPU, float32 on a CPU), or a torch dtype name
    compile          torch.compile the model for training (default false; shapes vary, so dynamic)
    lr 2e-3, epochs 3, batch_size 64, weight_decay 0.0, warmup_frac 0.05, max_grad_norm 1.0, seed 0
    num_threads      torch threads per worker (default: the worker's CPUs on Ray; torch's default inline).
                     On a machine shared with other busy processes, 1 thread is far faster than 2: spinning
                     OpenMP threads that are descheduled stall each other (measured: 8x).

Loss is on the answer tokens only, with logits computed only at the answer positions (model/training.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recupdate_workloads.data.types import Triples
from recupdate_workloads.model.examples import Examples, curate

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "TrainResult",
    "curate",
    "ensure_ray",
    "load_adapter",
    "private_ray_temp_dir",
    "run_inline",
    "run_ray",
    "shutdown_ray",
    "train_loop_per_worker",
]

#: The linear layers of the Llama family (Llama, Qwen2, Mistral): what the default ("auto") adapts there.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS: dict[str, Any] = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"},
    "dtype": "auto",
    "lr": 2e-3,
    "epochs": 3,
    "batch_size": 64,
    "weight_decay": 0.0,
    "warmup_frac": 0.05,
    "max_grad_norm": 1.0,
    "seed": 0,
}
METRICS_FILE = "metrics.json"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrainResult:
    """Where the adapter is, and what the run did. ``metrics`` holds examples, tokens (all ranks, all epochs),
    train_loss (last epoch, per answer token), seconds (training epochs only), cpu_seconds (training, all
    ranks), epoch_seconds, setup_seconds (in the worker, before the first step) and wall_seconds (the whole
    executor call, start-up included)."""

    adapter_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    cfg = {**DEFAULTS, **config}
    cfg["lora"] = {**DEFAULTS["lora"], **(config.get("lora") or {})}
    for key in ("base_model", "output_dir"):
        if not cfg.get(key):
            raise ValueError(f"config needs {key!r}")
    if cfg.get("examples") is None and not cfg.get("examples_path"):
        raise ValueError("config needs 'examples' or 'examples_path'")
    return cfg


def _examples(cfg: dict[str, Any]) -> Examples:
    ex = cfg.get("examples")
    if ex is not None:
        return ex if isinstance(ex, Examples) else Examples.from_records(list(ex))
    return Examples.load(cfg["examples_path"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune a LoRA adapter on the config's examples; the function Ray Train runs on every worker and
    ``run_inline`` runs in-process. Under Ray (config["_executor"] == "ray") the model is prepared with
    ``ray.train.torch.prepare_model`` (DDP when world > 1), examples are sharded by rank, every rank calls
    ``ray.train.report`` and rank 0 attaches the adapter checkpoint. Inline, the adapter is saved to
    output_dir with its metrics.json."""
    import torch

    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = _with_defaults(config)
    # Ray sets OMP_NUM_THREADS=1 in workers: run_ray passes the worker's CPUs. Inline, torch's default
    # (physical cores, or OMP_NUM_THREADS) stands unless the config says otherwise.
    threads = int(cfg.get("num_threads") or torch.get_num_threads())
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _train(cfg, threads, t_start, cpu_start)
    finally:
        torch.set_num_threads(prev_threads)  # inline, the caller's process keeps its setting


def _train(cfg: dict[str, Any], threads: int, t_start: float, cpu_start: float) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from recupdate_workloads.model.bootstrap import load_base
    from recupdate_workloads.model.hf import default_device, fan_in_fan_out, lora_target_modules, resolve_dtype
    from recupdate_workloads.model.training import encode_examples, fit

    on_ray = cfg.get("_executor") == "ray"
    rank, world = 0, 1
    device: Any = "cpu"
    if on_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
    else:
        device = cfg.get("device") or default_device()

    base, tokenizer = load_base(cfg["base_model"], device=device, dtype=resolve_dtype(cfg.get("dtype"), device))
    for p in base.parameters():
        p.requires_grad_(False)
    lora = {**cfg["lora"], "target_modules": lora_target_modules(base, cfg["lora"].get("target_modules"))}
    torch.manual_seed(int(cfg["seed"]))
    peft_model = get_peft_model(
        base,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=int(lora["r"]),
            lora_alpha=int(lora["alpha"]),
            lora_dropout=float(lora["dropout"]),
            target_modules=lora["target_modules"],
            fan_in_fan_out=fan_in_fan_out(base, lora["target_modules"]),
        ),
    )
    examples = _examples(cfg)
    encoded = encode_examples(tokenizer, examples.prompts, examples.answers)
    model: Any = peft_model
    if on_ray:
        model = ray.train.torch.prepare_model(peft_model)
    if cfg.get("compile"):
        model = torch.compile(model, dynamic=True)
    setup_seconds = time.perf_counter() - t_start

    stats = fit(
        model,
        encoded,
        pad_id=tokenizer.pad_token_id,
        epochs=int(cfg["epochs"]),
        batch_size=int(cfg["batch_size"]),
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight_decay"]),
        warmup_frac=float(cfg["warmup_frac"]),
        max_grad_norm=float(cfg["max_grad_norm"]),
        seed=int(cfg["seed"]),
        rank=rank,
        world=world,
    )
    totals = [float(stats.examples), float(stats.tokens), stats.train_loss * stats.answer_tokens, stats.cpu_seconds]
    answer_tokens = float(stats.answer_tokens)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([*totals, answer_tokens], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        *totals, answer_tokens = t.tolist()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    metrics: dict[str, Any] = {
        "examples": int(totals[0]),
        "tokens": int(totals[1]),
        "train_loss": totals[2] / max(1.0, answer_tokens) if world > 1 else stats.train_loss,
        "epoch_loss": stats.epoch_loss,
        "seconds": stats.seconds,
        "epoch_seconds": stats.epoch_seconds,
        "cpu_seconds": totals[3],
        "setup_seconds": setup_seconds,
        "worker_seconds": time.perf_counter() - t_start,
        "worker_cpu_seconds": time.process_time() - cpu_start,
        "examples_per_second": totals[0] / stats.seconds if stats.seconds else None,
        "tokens_per_second": totals[1] / stats.seconds if stats.seconds else None,
        "trainable_parameters": trainable,
        "world_size": world,
        "num_threads": threads,
        "lora": lora,
    }

    if on_ray:
        from ray.train import Checkpoint

        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_adapter(peft_model, Path(d), metrics)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    else:
        _save_adapter(peft_model, Path(cfg["output_dir"]), metrics)


def _save_adapter(peft_model: Any, out: Path, metrics: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)  # adapter only
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))


def run_inline(config: dict[str, Any]) -> TrainResult:
    """Run the training loop in this process; the adapter goes to config["output_dir"]."""
    t0 = time.perf_counter()
    train_loop_per_worker({**config, "_executor": "inline"})
    out = Path(config["output_dir"])
    metrics = json.loads((out / METRICS_FILE).read_text())
    metrics["wall_seconds"] = time.perf_counter() - t0
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    return TrainResult(str(out), metrics)


_local_session: str | None = None  # the session directory of the local Ray this process started


def default_ray_temp_dir() -> str:
    # Short (Ray's socket paths must stay under ~107 characters), inside a directory of this user only.
    return os.path.join(tempfile.gettempdir(), f"recupdate-{os.getuid()}", "ray")


def _make_private(d: Path) -> None:
    """``d`` as a 0700 directory of this user: created so, or an existing one tightened; never one that
    belongs to someone else (or is a link), who could read what Ray writes there."""
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeError(f"{d} is not a directory of this user: Ray's files must be private to it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)


def private_ray_temp_dir(base: str | None = None) -> str:
    """The temp dir for a local Ray: ``<base>/ray``, where ``base`` (default /tmp/recupdate-<uid>) is made a
    0700 directory of this user. Ray makes its own temp dir world-writable and its logs world-readable, and
    sets 0777 again while it runs (when a runtime_env is set up), so the privacy comes from the enclosing
    directory, which Ray never touches."""
    ray_dir = Path(base).absolute() / "ray" if base else Path(default_ray_temp_dir())
    ray_dir.parent.parent.mkdir(parents=True, exist_ok=True)
    _make_private(ray_dir.parent)
    ray_dir.mkdir(mode=0o700, exist_ok=True)
    return str(ray_dir)


def ensure_ray(num_cpus: int | None = None, temp_dir: str | None = None, log_to_driver: bool = True) -> bool:
    """Connect to Ray unless already connected: to the cluster in RAY_ADDRESS when set (production), else a
    fresh local one sized for small machines, its files in a directory private to this user
    (``private_ray_temp_dir``: ``temp_dir``/ray) and its session directory removed when it stops
    (``shutdown_ray``, also at exit). Returns True when this call started the connection."""
    import ray

    global _local_session
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        if _local_session is not None:  # an earlier local Ray of this process, stopped by ray.shutdown()
            shutdown_ray()
        temp = private_ray_temp_dir(temp_dir)
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 << 20,
            _temp_dir=temp,
            log_to_driver=log_to_driver,
        )
        _local_session = _session_dir()
        if _local_session is not None:
            atexit.unregister(shutdown_ray)
            atexit.register(shutdown_ray)  # runs before Ray's own atexit shutdown (registered earlier)
    return True


def _session_dir() -> str | None:
    try:
        from ray._private import worker

        node = worker._global_node
        return str(node.get_session_dir_path()) if node is not None else None
    except Exception:  # a Ray without this private API: nothing to clean up
        return None


def shutdown_ray() -> None:
    """Stop Ray; when this process started it (``ensure_ray``), also remove its session directory (logs,
    sockets, runtime_env resources), which Ray leaves behind."""
    import ray

    global _local_session
    ray.shutdown()
    session, _local_session = _local_session, None
    if session is None:
        return
    shutil.rmtree(session, ignore_errors=True)
    latest = os.path.join(os.path.dirname(session), "session_latest")
    if os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(session):
        with contextlib.suppress(OSError):
            os.unlink(latest)


def run_ray(
    config: dict[str, Any],
    *,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: int | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> TrainResult:
    """Run the training loop on Ray Train (TorchTrainer, ``workers`` workers). The checkpoint lands under
    ``storage_path`` (default: ``<output_dir>/../ray_results``) and is copied to config["output_dir"]. Ray is
    initialised if needed (``ensure_ray``) and left running for later calls."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    cfg = _with_defaults(config)
    out = Path(cfg["output_dir"]).absolute()
    ensure_ray()
    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    loop_cfg = {**cfg, "_executor": "ray", "num_threads": cfg.get("num_threads") or cpus}
    if isinstance(loop_cfg.get("examples"), Examples):
        loop_cfg["examples"] = loop_cfg["examples"].to_records()
    storage = Path(storage_path).absolute() if storage_path else out.parent / "ray_results"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=name or f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", storage_path=str(storage)
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    if out.exists():
        shutil.rmtree(out)
    result.checkpoint.to_directory(str(out))
    metrics = dict(result.metrics or {})
    if not metrics:
        metrics = json.loads((out / METRICS_FILE).read_text())
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics["checkpoint_uri"] = result.checkpoint.path
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    return TrainResult(str(out), metrics)


def load_adapter(base: Any, adapter_dir: str | os.PathLike[str], *, merge: bool = False) -> Any:
    """A PEFT model (eval mode) for inference: ``base`` is a loaded model or a base path (then loaded with
    ``load_base``). With ``merge`` the LoRA weights are folded into a copy-free plain model (faster bulk
    inference; the base object is modified)."""
    from peft import PeftModel

    if isinstance(base, (str, os.PathLike)):
        from recupdate_workloads.model.bootstrap import load_base

        base, _ = load_base(base)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    if merge:
        model = model.merge_and_unload()
        model.eval()
    return model


def curate_triples(triples: Triples, max_per_pair: int | None = None, seed: int = 0) -> Triples:
    """Alias of ``model.examples.curate`` (dedupe (user, c1, c2, c_next), cap per pair)."""
    return curate(triples, max_per_pair, seed)
