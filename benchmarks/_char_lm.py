"""A small character-level GPT, its offline corpus, and how it is trained and scored.

The corpus is the text of Debian's ``fortunes`` package (``apt-get install
fortunes``: about 2.5 MB of plain English text in ``/usr/share/games/fortunes``,
quotations, jokes, definitions, computer lore), the only sizeable prose that
installs on the benchmark machine without a download at run time. The files
are read in sorted order and cut into segments of :data:`SEGMENT` characters;
a seeded permutation assigns 90 % of the segments to training, 5 % to the
held-out split (alignment and validation data of the merges, never trained
on) and 5 % to the test split. The vocabulary is every character of the
corpus, sorted.

The model (:class:`CharGPT`) is GPT-2's layout at a small size: token and
learned position embeddings, pre-norm blocks of causal multi-head
self-attention (one fused ``qkv`` Linear, PyTorch's scaled dot-product
attention) and a GELU MLP, a final LayerNorm and an output Linear (untied
from the token embedding unless ``tied=True``). It is trained by
:func:`train_char_gpt` (AdamW, linear warmup then cosine decay, random
windows of the training text).

Used by ``benchmarks/char_gpt.py`` (which trains the committed checkpoints
of ``benchmarks/models/char-gpt/`` and merges them) and by
``tests/test_benchmark_models.py`` (the model merges exactly with a permuted
copy of itself).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skmerge.models.vit import Block

CORPUS_DIR = Path("/usr/share/games/fortunes")
#: Characters per segment of the train / held-out / test split.
SEGMENT = 4096
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.9, 0.05, 0.05)


# --------------------------------------------------------------------------
# corpus


def corpus_files(root: Path = CORPUS_DIR) -> list[Path]:
    """The plain-text fortune files of ``root``, sorted (index files and links skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: install Debian's fortunes package "
                                "(apt-get install fortunes)")
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def load_corpus(root: Path = CORPUS_DIR) -> dict:
    """The corpus split into train / held-out / test text, and its vocabulary.

    Returns
    -------
    dict
        ``train``, ``heldout``, ``test`` (int64 tensors of character ids),
        ``vocab`` (the sorted characters, a str) and ``info`` (file names,
        character counts).
    """
    files = corpus_files(root)
    text = "".join(p.read_bytes().decode("utf-8", errors="replace") for p in files)
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n_segments = len(ids) // SEGMENT
    order = np.random.default_rng(SPLIT_SEED).permutation(n_segments)
    n_train = int(round(SPLIT_FRACTIONS[0] * n_segments))
    n_heldout = int(round(SPLIT_FRACTIONS[1] * n_segments))
    parts = {"train": np.sort(order[:n_train]), "heldout": np.sort(order[n_train:n_train + n_heldout]),
             "test": np.sort(order[n_train + n_heldout:])}
    segments = ids[:n_segments * SEGMENT].view(n_segments, SEGMENT)
    out = {name: segments[torch.as_tensor(idx)].reshape(-1) for name, idx in parts.items()}
    out["vocab"] = vocab
    out["info"] = {"files": [p.name for p in files], "characters": len(ids), "vocab_size": len(vocab),
                   **{f"{name}_characters": int(out[name].numel()) for name in parts}}
    return out


def windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(inputs, next characters)`` windows of ``context`` characters."""
    n = (len(ids) - 1) // context
    x = ids[:n * context].view(n, context)
    y = ids[1:n * context + 1].view(n, context)
    return x.contiguous(), y.contiguous()


# --------------------------------------------------------------------------
# model


class CharGPT(nn.Module):
    """A GPT-2-style decoder over characters.

    Parameters
    ----------
    vocab_size : int
    context : int, default=128
        Longest input; the position embedding has this many rows.
    dim : int, default=128
    depth : int, default=4
    heads : int, default=4
    mlp_ratio : int, default=4
    tied : bool, default=False
        Share the output layer's weight with the token embedding (GPT-2 does).
    """

    def __init__(self, vocab_size: int, context: int = 128, dim: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: int = 4, tied: bool = False) -> None:
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio * dim, causal=True) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * depth))
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, length, vocab)`` of the next character after each position."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------
# training and scoring


def train_char_gpt(model: CharGPT, train_ids: torch.Tensor, *, steps: int, seed: int,
                   batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 0.1,
                   warmup_fraction: float = 0.05, log_every: int = 0) -> dict:
    """Train ``model`` in place on random windows of ``train_ids``; returns the training record."""
    g = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, int(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    context = model.context
    offsets = torch.arange(context + 1)
    model.train()
    tick, losses = time.perf_counter(), []
    for step in range(steps):
        start = torch.randint(0, len(train_ids) - context - 1, (batch_size, 1), generator=g)
        chunk = train_ids[start + offsets]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at step {step} (loss={loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - tick:.0f} s)", flush=True)
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "warmup_fraction": warmup_fraction, "betas": [0.9, 0.95], "grad_clip": 1.0,
            "final_train_loss": float(np.mean(losses[-50:])),
            "train_seconds": round(time.perf_counter() - tick, 1)}


@torch.no_grad()
def bits_per_character(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Mean cross-entropy of the next character, in bits (lower is better)."""
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + batch].reshape(-1),
                                 reduction="sum").item()
    return total / y.numel() / math.log(2)


@torch.no_grad()
def ensemble_bits_per_character(models, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Bits per character of the models' averaged next-character probabilities."""
    total = 0.0
    for i in range(0, len(x), batch):
        probs = torch.stack([F.softmax(m(x[i:i + batch]), -1) for m in models]).mean(0)
        total += F.nll_loss(probs.clamp_min(1e-12).log().reshape(-1, probs.shape[-1]),
                            y[i:i + batch].reshape(-1), reduction="sum").item()
    return total / y.numel() / math.log(2)
