"""The embedded demo (``make demo``): import, evaluate, train SimPO with 2 processes, evaluate.

    python tools/demo.py [--nproc 2] [--out runs/demo]

1. ``convert hf-to-mcore`` the tiny HF model in ``examples/tiny`` (random init, made by
   ``tools/make_tiny_model.py``);
2. ``evaluate`` held-out preference accuracy;
3. ``train`` SimPO at tensor-parallel size 2 (``examples/tiny/simpo.yaml``), with TensorBoard logs;
4. ``evaluate`` again;
5. ``convert mcore-to-hf`` the trained model and load it back with ``transformers``; summary.
CPU only; about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], quiet: bool = False) -> None:
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    lines = [x for x in res.stdout.splitlines() if x.strip()]
    if not quiet:
        print("\n".join(lines), flush=True)
    if res.returncode != 0:
        errors = [x for x in res.stderr.splitlines() if "error:" in x]
        print("\n".join(errors) or res.stderr[-5000:], file=sys.stderr)
        sys.exit(f"demo: step failed ({res.returncode}): {' '.join(cmd)}")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "megatron_simpo",
        *args,
    ]


def load_back(hf_dir: Path) -> str:
    """Loads the exported model with transformers and answers one held-out question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    row = json.loads((REPO / "examples/tiny/heldout.jsonl").read_text().splitlines()[0])
    text = tok.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    n = sum(p.numel() for p in model.parameters())
    return (
        f"loaded by transformers ({type(model).__name__}, {n:,} parameters); "
        f"greedy answer to '{row['prompt']}': '{answer.strip()}'"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size")
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args()
    out = REPO / args.out
    if out.exists():
        shutil.rmtree(out)
    start = time.time()
    tp = ["--tensor-model-parallel-size", str(args.nproc)]
    cache = ["--data-cache-dir", str(out / "cache")]
    heldout = ["--data-path", "examples/tiny/heldout.jsonl", "--micro-batch-size", "30", *cache]
    run(
        [
            sys.executable,
            "-m",
            "megatron_simpo",
            "convert",
            "hf-to-mcore",
            "--hf-dir",
            "examples/tiny",
            "--save",
            str(out / "init"),
        ]
    )
    run(
        torchrun(
            args.nproc,
            "evaluate",
            "--load",
            str(out / "init"),
            *heldout,
            *tp,
            "--output",
            str(out / "eval_before.json"),
        )
    )
    run(
        torchrun(
            args.nproc,
            "train",
            "--config",
            "examples/tiny/simpo.yaml",
            "--load",
            str(out / "init"),
            "--save",
            str(out / "ckpt"),
            *tp,
            "--tensorboard-dir",
            str(out / "tb"),
        )
    )
    run(
        torchrun(
            args.nproc,
            "evaluate",
            "--load",
            str(out / "ckpt"),
            *heldout,
            *tp,
            "--output",
            str(out / "eval_after.json"),
        )
    )
    run(
        [
            sys.executable,
            "-m",
            "megatron_simpo",
            "convert",
            "mcore-to-hf",
            "--load",
            str(out / "ckpt"),
            "--hf-dir",
            str(out / "hf"),
        ]
    )
    hf_check = load_back(out / "hf")
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    acc = f"{before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}"
    print(f"""
==================== megatron-simpo demo ({time.time() - start:.0f} s) ====================
held-out preference accuracy: {acc}
held-out reward margin:       {before["rewards/margins"]:+.3f} -> {after["rewards/margins"]:+.3f}
held-out SimPO loss:          {before["loss"]:.3f} -> {after["loss"]:.3f}
({before["num_pairs"]} held-out pairs, operands never seen in training)

checkpoints:  {rel}/init (imported), {rel}/ckpt (trained)
HF export:    {rel}/hf — {hf_check}
evaluations:  {rel}/eval_before.json, {rel}/eval_after.json (per-pair results inside)
metrics:      {rel}/tb/metrics.jsonl
TensorBoard:  .venv/bin/tensorboard --logdir {rel}/tb   (then open http://localhost:6006)
""")


if __name__ == "__main__":
    main()
