"""A small character-level transformer language model that survives being killed.

The training program that ``examples/demo.py`` (``make demo``) drives and that
``tests/test_crash_resume.py`` kills at random moments. It is an ordinary training script:

- data: a deterministic synthetic corpus of English-like sentences from a small grammar
  (generated at start from its own seeded ``random.Random``, so every process has the same text);
- model: a 2-layer GPT-style transformer (d_model 64, 4 heads, dropout 0.1, context 64);
- AdamW, a warmup + cosine LR schedule (``LambdaLR``), dropout drawn from the global torch RNG;
- data: a shuffled DataLoader wrapped in ``sv.resumable`` (its order drawn from a dedicated
  ``torch.Generator``): the epoch and the batch are in the state;
- every step's loss is part of the saved state, so the last checkpoint carries the loss curve.

Checkpointing is the documented three-line pattern of :class:`statevault.CheckpointManager`::

    r = mgr.restore(into=state)
    start = r.step + 1 if r else 0
    for step in range(start, total):
        ...
        if mgr.should_save(step):
            mgr.save(step, state, metrics={"loss": loss})
            if mgr.preempted:          # SIGTERM / SIGUSR1: that save is durable; exit cleanly
                break

Usage::

    python examples/train_lm.py --run-dir RUN [--steps 400] [--save-every 25] [--slow-save MIB]
                                [--print-progress]

Kill it (SIGKILL) at any moment and start it again with the same arguments: it resumes from the
newest valid checkpoint and ends exactly where an uninterrupted run ends. SIGTERM makes it save
at its next step and exit with status 0. At the end it writes ``RUN/final.json``: a checksum of
the parameters and the whole loss curve as ``float.hex`` strings (bit-exact).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import statevault as sv

SEED = 1234
CONTEXT = 64
D_MODEL = 64
HEADS = 4
LAYERS = 2
DROPOUT = 0.1
BATCH = 8
LEARNING_RATE = 3e-3
WARMUP_STEPS = 30

# -- data -------------------------------------------------------------------------------------

_NOUNS = ("fox", "dog", "cat", "bird", "owl", "horse", "river", "king", "child", "wizard", "robot")
_ADJECTIVES = ("quick", "lazy", "small", "brave", "old", "quiet", "bright", "clever", "golden")
_VERBS = ("chases", "sees", "follows", "watches", "finds", "helps", "greets", "carries", "admires")
_PLACES = ("near the river", "in the forest", "under the bridge", "on the hill", "at dawn")


def make_corpus(sentences: int = 3000, seed: int = 7) -> str:
    """English-like sentences from a small grammar; the same text in every process."""
    rng = random.Random(seed)

    def noun_phrase() -> str:
        article = rng.choice(("the", "a", "every", "one"))
        adjective = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.6 else ""
        return f"{article} {adjective}{rng.choice(_NOUNS)}"

    lines = []
    for _ in range(sentences):
        sentence = f"{noun_phrase()} {rng.choice(_VERBS)} {noun_phrase()}"
        if rng.random() < 0.5:
            sentence += f" {rng.choice(_PLACES)}"
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice((".", ".", "!", "?")))
    return " ".join(lines)


class Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training windows of ``context + 1`` characters: (inputs, targets) shifted by one."""

    def __init__(self, tokens: torch.Tensor, context: int) -> None:
        self.tokens, self.context = tokens, context
        self.starts = torch.arange(0, len(tokens) - context - 1, context // 2).tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        row = self.tokens[start : start + self.context + 1]
        return row[:-1], row[1:]


def endless(data: Any) -> Iterator[Any]:
    """One epoch after another; the first ``next()`` continues the restored position."""
    while True:
        yield from data


# -- model ------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(
            nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL)
        )
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D_MODEL, dim=-1)
        q, k, v = (t.view(batch, length, HEADS, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=DROPOUT if self.training else 0.0
        )
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, -1)))
        out: torch.Tensor = x + self.dropout(self.mlp(self.norm2(x)))
        return out


class CharTransformer(nn.Module):
    """A tiny GPT: token + position embeddings, pre-norm blocks, a tied output head."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D_MODEL)
        self.position = nn.Embedding(CONTEXT, D_MODEL)
        self.dropout = nn.Dropout(DROPOUT)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        for module in self.modules():  # GPT-2's initialisation: small weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        x = self.dropout(self.embed(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.norm(x) @ self.embed.weight.T  # tied output head
        return logits


def warmup_cosine(total: int) -> Any:
    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def parameters_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# -- the program ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="the checkpoint run directory")
    parser.add_argument("--steps", type=int, default=400, help="total training steps")
    parser.add_argument("--save-every", type=int, default=25, help="checkpoint interval (steps)")
    parser.add_argument(
        "--keep-every", type=int, default=None, help="keep every N-th step's checkpoint forever"
    )
    parser.add_argument(
        "--slow-save",
        type=float,
        default=0.0,
        metavar="MIB",
        help="add a MIB-sized ballast tensor to the state so that saves take longer",
    )
    parser.add_argument(
        "--print-progress", action="store_true", help="print step / saving / saved lines"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # deterministic, and fastest for a model this small

    def say(line: str) -> None:
        if args.print_progress:  # one write per line: a kill never leaves half a line
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    random.seed(SEED)
    torch.manual_seed(SEED)
    text = make_corpus()
    vocab = sorted(set(text))
    tokens = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    data = sv.resumable(
        DataLoader(
            Windows(tokens, CONTEXT),
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(SEED + 1),
        )
    )
    model = CharTransformer(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": sv.RNGState(),
        "data": data,
    }
    if args.slow_save > 0:
        state["ballast"] = torch.zeros(int(args.slow_save * (1 << 20)) // 4)
    losses: list[float] = []

    mgr = sv.CheckpointManager(
        args.run_dir,
        max_to_keep=3,
        keep_every_n_steps=args.keep_every,
        best_metric="loss",
        save_interval_steps=args.save_every,
        async_save=True,
        options=sv.RunOptions(
            metadata={"program": "train_lm", "steps": args.steps, "save_every": args.save_every}
        ),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = mgr.restore(into=state)
    for warning in caught:  # e.g. "skipping damaged checkpoint ...": shown, and told to a driver
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        say(f"warning {warning.message}")
    start = r.step + 1 if r else 0
    if r is not None:
        losses = list(r.state["losses"])
        if len(losses) != start:
            raise SystemExit(f"checkpoint {r.path} holds {len(losses)} losses, expected {start}")
    say(f"resumed {r.step}" if r else "fresh")

    model.train()
    committed = mgr.latest_step()
    batches = endless(data)
    for step in range(start, args.steps):
        inputs, targets = next(batches)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.item()))
        say(f"step {step} {losses[-1].hex()}")

        final = step == args.steps - 1
        if final or mgr.should_save(step):
            say(f"saving {step}")
            mgr.save(
                step, {**state, "losses": list(losses)}, metrics={"loss": losses[-1]}, force=final
            )
            say(f"saved {step}")  # staged: training may go on while it is written
            # Break only right after a save: a signal landing between should_save() and this
            # check is then still saved (a preemption save is durable when save() returns; a
            # regular one that the signal interrupted is made durable by close() below).
            if mgr.preempted:
                say(f"preempted {step}")
                break
        if mgr.latest_step() != committed:
            committed = mgr.latest_step()
            say(f"durable {committed}")
    mgr.close()
    if mgr.latest_step() != committed:
        say(f"durable {mgr.latest_step()}")

    if len(losses) == args.steps:
        write_final(args.run_dir, model, losses)
        say("finished")
    return 0


def write_final(run_dir: str, model: nn.Module, losses: list[float]) -> None:
    """final.json: the parameters' checksum and the loss curve, exact (float.hex)."""
    document = {
        "steps": len(losses),
        "parameters_sha256": parameters_checksum(model),
        "losses": [loss.hex() for loss in losses],
    }
    path = os.path.join(run_dir, "final.json")
    with open(f"{path}.partial", "w") as handle:
        json.dump(document, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(f"{path}.partial", path)


if __name__ == "__main__":
    sys.exit(main())
