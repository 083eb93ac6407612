"""The training core shared by the base bootstrap (full parameters) and LoRA fine-tuning (train_loop.py).

Loss is on the answer tokens only (answer + EOS): the prompt is masked. Batches are LEFT-padded so every
answer ends at the last position; the model is asked for logits at the last ``A + 1`` positions only
(``logits_to_keep``), where A is the longest answer in the batch. So the vocabulary projection costs
O(batch * A) instead of O(batch * sequence), which matters for real LLMs with 150k-word vocabularies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recupdate_workloads.model.prompt import ANSWER_PREFIX


@dataclass
class Encoded:
    """Token ids of examples: ``sequences[i]`` = prompt ids + answer ids (+ EOS); the answer is its tail."""

    sequences: list[list[int]]
    answer_lens: list[int]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def encode_examples(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], add_eos: bool = True) -> Encoded:
    """Tokenise prompts (with the tokenizer's special tokens, e.g. BOS) and answers (``ANSWER_PREFIX`` +
    answer, no special tokens) apart, exactly as scoring does, and join them."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers must have the same length")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    a_ids = tokenizer([ANSWER_PREFIX + a for a in answers], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    seqs: list[list[int]] = []
    lens: list[int] = []
    for p, a in zip(p_ids, a_ids, strict=True):
        ans = list(a) + ([eos] if add_eos and eos is not None else [])
        if not ans:
            raise ValueError("empty answer")
        seqs.append(list(p) + ans)
        lens.append(len(ans))
    return Encoded(seqs, lens)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded; positions count real tokens only, so a
    padded row gets the same positions as it would alone (also for absolute-position models)."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, t - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, t - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return to_device(ids, device), to_device(mask, device), to_device(pos, device)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without waiting (a plain copy from pageable
    memory waits for the device to finish its queued work, so the host could not run ahead)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return x.pin_memory().to(dev, non_blocking=True)
    return x.to(dev)


def forward_last(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int
) -> torch.Tensor:
    """Logits at the last ``keep`` positions only ([B, keep, V]), via ``logits_to_keep`` where supported."""
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep)
    except TypeError:  # an architecture without logits_to_keep: full logits, then slice
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits: torch.Tensor = out.logits
    return logits[:, -keep:]


def answer_batch_loss(
    model: Any, batch: Sequence[Sequence[int]], answer_lens: Sequence[int], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens of a batch, and their count."""
    ids, mask, pos = left_pad(batch, pad_id)  # built on the host, then moved together
    a = max(answer_lens)
    t = ids.shape[1]
    labels = ids[:, t - a :].clone()
    lens = torch.as_tensor(answer_lens)
    labels[torch.arange(a)[None, :] < (a - lens)[:, None]] = -100
    ids, mask, pos, labels = (to_device(x, device) for x in (ids, mask, pos, labels))
    logits = forward_last(model, ids, mask, pos, a + 1)[:, :-1]  # position p predicts token p + 1
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return loss, int(sum(answer_lens))  # counted on the host: no device sync


@dataclass
class FitStats:
    """What one rank did: its examples and tokens over all epochs, loss per epoch, time per epoch."""

    examples: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    epoch_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    steps: int = 0

    @property
    def train_loss(self) -> float:
        return self.epoch_loss[-1] if self.epoch_loss else float("nan")

    @property
    def seconds(self) -> float:
        return float(sum(self.epoch_seconds))


def shard_indices(n: int, rank: int, world: int, seed: int) -> np.ndarray:
    """This rank's examples: a seeded permutation cut into ``world`` equal shards (the remainder dropped,
    so every rank runs the same number of steps, as DDP requires)."""
    perm = np.random.default_rng(seed).permutation(n)
    per = n // world
    if per == 0:
        raise ValueError(f"{n} examples cannot be shared among {world} workers")
    return perm[rank * per : (rank + 1) * per]


def make_batches(
    indices: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches, length-bucketed within windows of 32 batches to cut padding."""
    idx = indices[rng.permutation(len(indices))]
    window = batch_size * 32
    batches: list[np.ndarray] = []
    for start in range(0, len(idx), window):
        chunk = idx[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def fit(
    model: Any,
    encoded: Encoded,
    *,
    pad_id: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.05,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    on_epoch: Callable[[int, FitStats], None] | None = None,
) -> FitStats:
    """Train the parameters of ``model`` that require grad (AdamW, linear warm-up then linear decay),
    on this rank's shard. ``model`` may be DDP-wrapped: the forward goes through the wrapper."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0].device
    # Fused: one kernel for all parameters instead of several per tensor (CUDA only).
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    mine = shard_indices(len(encoded), rank, world, seed)
    lengths = np.array([len(s) for s in encoded.sequences])
    steps_per_epoch = math.ceil(len(mine) / batch_size)
    total = max(1, steps_per_epoch * epochs)
    warm = max(1, int(total * warmup_frac))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    autocast = device.type == "cuda"
    stats = FitStats()
    model.train()
    cpu0 = time.process_time()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed + 1 + epoch * 7919 + rank)
        # The loss is summed on the device and read once per epoch: reading it every step would make the host
        # wait for the device, which then waits for the host to launch the next step.
        loss_sum, ans_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
        for b in make_batches(mine, lengths, batch_size, rng):
            seqs = [encoded.sequences[i] for i in b]
            alens = [encoded.answer_lens[i] for i in b]
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
                loss, n = answer_batch_loss(model, seqs, alens, pad_id, device)
            (loss / n).backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            ans_tokens += n
            stats.examples += len(b)
            stats.tokens += sum(len(s) for s in seqs)
            stats.steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.answer_tokens += ans_tokens
        stats.epoch_loss.append(float(loss_sum) / max(1, ans_tokens))
        stats.epoch_seconds.append(time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    stats.cpu_seconds = time.process_time() - cpu0
    model.eval()
    return stats
