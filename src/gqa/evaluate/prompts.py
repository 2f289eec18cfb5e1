"""Greedy-continuation agreement: does a converted model still answer a prompt set the way the original does?

Perplexity and KL average over every position; a model can keep both close and still lose what it knew
("The capital of France is" -> "the capital of France." instead of "Paris."). Here each prompt is continued
greedily by the model and by its teacher (the original), and the two continuations are compared token by
token. The project ships one set, ``prompts:knowledge`` (``gqa/assets/prompts/knowledge.txt``: short factual,
code and completion prompts); a text file (one prompt per line) or a ``.jsonl`` file (``{"prompt": ...}`` per
line) works too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gqa.errors import GQAUserError

__all__ = ["PromptAgreement", "load_prompts", "greedy_agreement", "BUILTIN_PROMPTS"]

BUILTIN_PROMPTS = {"knowledge": Path(__file__).resolve().parents[1] / "assets" / "prompts" / "knowledge.txt"}


@dataclass
class PromptAgreement:
    """identical: share of prompts whose whole continuation equals the teacher's; prefix: mean share of
    tokens before the first difference; rows: per prompt, both texts and the common-prefix length."""

    prompts: int
    new_tokens: int
    identical: float
    prefix: float
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_prompts(spec: str) -> list[str]:
    """``prompts:NAME`` (a shipped set), a ``.txt`` file (one prompt per line) or a ``.jsonl`` file."""
    if spec.startswith("prompts:"):
        name = spec.partition(":")[2]
        if name not in BUILTIN_PROMPTS:
            raise GQAUserError(
                f"unknown prompt set {spec!r}; shipped: {', '.join('prompts:' + k for k in BUILTIN_PROMPTS)}"
            )
        path = BUILTIN_PROMPTS[name]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise GQAUserError(f"{path} does not exist; pass a prompt file (.txt or .jsonl) or prompts:knowledge")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = [_jsonl_prompt(line, path, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GQAUserError(f"{path} holds no prompts; put one per line")
    return prompts


def _jsonl_prompt(line: str, path: Path, n: int) -> str:
    try:
        row = json.loads(line)
    except ValueError:
        raise GQAUserError(f'{path}:{n} is not JSON; write one {{"prompt": ...}} object per line') from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise GQAUserError(f'{path}:{n} has no "prompt" string; write one {{"prompt": ...}} object per line')
    return row["prompt"]


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` from a gqa or a transformers model (no early stop)."""
    from gqa.generation import generate
    from gqa.model import GQAForCausalLM

    if isinstance(model, GQAForCausalLM):
        return generate(model, [ids], max_new_tokens=n, eos_token_id=None).tokens[0]
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def greedy_agreement(model, teacher, tokenizer, prompts: list[str], new_tokens: int = 16) -> PromptAgreement:
    """Continue each prompt ``new_tokens`` tokens greedily with both models and compare (prompts are
    encoded the way the tokenizer asks, a BOS in front where it adds one)."""
    if new_tokens < 1:
        raise GQAUserError(f"--prompt-tokens must be >= 1, got {new_tokens}")
    rows = []
    for p in prompts:
        ids = list(tokenizer.encode(p))
        mine, theirs = _greedy(model, ids, new_tokens), _greedy(teacher, ids, new_tokens)
        common = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), new_tokens)
        rows.append({"prompt": p, "model": tokenizer.decode(mine), "teacher": tokenizer.decode(theirs),
                     "common_tokens": common, "identical": common == new_tokens})  # fmt: skip
    return PromptAgreement(
        prompts=len(rows),
        new_tokens=new_tokens,
        identical=sum(r["identical"] for r in rows) / len(rows),
        prefix=sum(r["common_tokens"] for r in rows) / (len(rows) * new_tokens),
        rows=rows,
    )
