"""Export parity of a latent model in DeepSeek-V2's layout: the same greedy tokens in gqa, transformers
(``DeepseekV2ForCausalLM``, no custom code) and llama.cpp (``deepseek2``, its MLA cache), on one converted model.

    python experiments/deepseek2_parity.py MODEL --tokenizer SRC.gguf --bin LLAMA_CPP_BIN \\
        [--out docs/results/deepseek2-export-parity]

MODEL is a gqa latent model with one shared rotated key head (``gqa convert SRC OUT --kv-latent R
--latent-rope shared --calib TEXT``, or ``experiments/latent_pareto.py --point shared:R:r --save DIR``); the
script writes its ``--export hf`` and ``--export gguf`` (float32) into a scratch folder beside ``--out``,
decodes greedily from each prompt in the three engines and compares. transformers gets gqa's token ids;
llama.cpp (a peer built by benchmarks/llamacpp_peer.sh, never a dependency) gets the prompt text and its
output text is compared with gqa's decoded text.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "To install the package, run",
    "The first president of the United States was",
]


def main() -> None:
    from gemma3_llamacpp import llama_simple  # the same greedy llama.cpp call as the Gemma-3 check

    from gqa.formats.deepseek2 import save_deepseek_v2
    from gqa.formats.gguf import export_gguf
    from gqa.generation import generate
    from gqa.model import load_model, load_model_tokenizer
    from gqa.provenance import load_average, provenance, provenance_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument(
        "--tokenizer", type=Path, required=True, help="the source GGUF (its tokenizer goes into the export)"
    )
    ap.add_argument("--bin", type=Path, help="folder holding llama.cpp's llama-simple (omit to skip llama.cpp)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("docs/results/deepseek2-export-parity"))
    args = ap.parse_args()
    load_before = load_average()
    torch.set_num_threads(2)
    model, tok = load_model(args.model, dtype=torch.float32).eval(), load_model_tokenizer(args.tokenizer)
    ids = [tok.encode(p) for p in PROMPTS]
    ours = generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=None).tokens
    rows = [{"prompt": p, "gqa": tok.decode(t), "gqa_ids": list(t)} for p, t in zip(PROMPTS, ours, strict=True)]
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir, gguf = Path(scratch) / "hf", Path(scratch) / "model.gguf"
        save_deepseek_v2(model, hf_dir, dtype=torch.float32)
        export_gguf(model, gguf, tokenizer_dir=args.tokenizer, dtype="f32")
        _transformers(hf_dir, ids, rows, args.new_tokens)
        if args.bin is not None:
            for row in rows:
                row["llama.cpp"] = llama_simple(args.bin, gguf, row["prompt"], args.new_tokens)
    for row in rows:
        row["transformers_equal"] = row["transformers_ids"] == row["gqa_ids"]
        if "llama.cpp" in row:  # llama.cpp prints the text it decodes; compare over what both produced
            row["llama.cpp_equal"] = row["llama.cpp"].strip() == row["gqa"].strip()
    prov = provenance(dtype="float32", load_before=load_before, model=args.model.name, new_tokens=args.new_tokens)
    _write(args.out, rows, prov, model.config, provenance_markdown)
    print(json.dumps([{k: v for k, v in r.items() if not k.endswith("_ids")} for r in rows], indent=1), file=sys.stderr)


def _transformers(folder: Path, ids: list[list[int]], rows: list[dict], n: int) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, row in zip(ids, rows, strict=True):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        row["transformers_ids"] = out[0, len(prompt) :].tolist()


def _write(out: Path, rows: list[dict], prov: dict, cfg, provenance_markdown) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "provenance": prov}, indent=1) + "\n")
    same_hf = sum(r["transformers_equal"] for r in rows)
    same_cpp = sum(r.get("llama.cpp_equal", False) for r in rows)
    lines = [
        "# DeepSeek-V2 exports of a latent SmolLM2: greedy tokens in gqa, transformers and llama.cpp",
        "",
        f"Model: rank {cfg.latent_ranks[0]} latent + {cfg.latent_rope_dim} rotated dims in one shared head "
        f"({cfg.latent_ranks[0] + cfg.latent_rope_dim} cache values per token and layer), float32 files. "
        "Written by `experiments/deepseek2_parity.py`.",
        "",
        f"- transformers (`DeepseekV2ForCausalLM`, gqa's token ids in): identical greedy ids on **{same_hf}/{len(rows)}** prompts.",
        f"- llama.cpp (`deepseek2`, `llama-simple`, text in): identical text on **{same_cpp}/{len(rows)}** prompts"
        + ("" if any("llama.cpp" in r for r in rows) else " (not run)")
        + ".",
        "",
        "| prompt | gqa | transformers = gqa | llama.cpp | llama.cpp = gqa |",
        "|---|---|---|---|---|",
    ]
    cell = lambda s: s.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    for r in rows:
        lines.append(
            f"| {cell(r['prompt'])} | {cell(r['gqa'])} | {r['transformers_equal']} | {cell(r.get('llama.cpp', '-'))} | {r.get('llama.cpp_equal', '-')} |"
        )
    lines += ["", "## Provenance", "", provenance_markdown(prov)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
