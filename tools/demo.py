"""The embedded demo (``make demo``): import, evaluate, train SimPO with 2 processes, evaluate.

    python tools/demo.py [--nproc 2] [--out runs/demo]

1. ``convert hf-to-mcore`` the tiny HF model in ``examples/tiny`` (a sloppy "SFT model", made
   by ``tools/make_tiny_model.py``);
2. ``evaluate`` held-out preference accuracy;
3. ``train`` SimPO at tensor-parallel size 2 (``examples/tiny/simpo.yaml``), with TensorBoard logs;
4. ``evaluate`` again;
5. ``convert mcore-to-hf`` the trained model; load it and the base with ``transformers`` and
   print their greedy answers to the held-out questions side by side, then the metrics.
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


def loss_flags(config: Path) -> list[str]:
    """The ``loss:`` section of a training YAML as flags, so that evaluation scores with the
    loss the run trains (not with whatever the defaults are)."""
    import yaml

    loss = yaml.safe_load(config.read_text())["loss"]
    return [x for k, v in loss.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def loaded_by_transformers(hf_dir: Path) -> str:
    """What ``transformers`` makes of an HF directory: class and parameter count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    n = sum(p.numel() for p in model.parameters())
    return f"loaded by transformers ({type(model).__name__}, {n:,} parameters)"


def answer_question(question: str) -> tuple[int, int]:
    """The operands of ``what is A plus B ?``."""
    words = question.split()
    return int(words[2]), int(words[4])


def greedy_answers(hf_dir: Path, questions: list[str]) -> list[str]:
    """Greedy answers of the HF model in ``hf_dir`` (loaded by ``transformers``), each prompt
    built as the trainer builds it (BOS + chat template)."""
    import torch
    from make_tiny_model import encode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    out = []
    for q in questions:
        ids, _ = encode(tok, q)
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        out.append(tok.decode(gen[0, len(ids) :], skip_special_tokens=True).strip())
    return out


def compare_answers(base_dir: Path, aligned_dir: Path, heldout: Path) -> list[dict]:
    """Per distinct held-out question: the base's and the aligned model's greedy answers and
    whether each is the preferred one (faithful restatement, right sum)."""
    questions = sorted({json.loads(line)["prompt"] for line in heldout.read_text().splitlines()})
    rows = []
    for q, base, aligned in zip(
        questions,
        greedy_answers(base_dir, questions),
        greedy_answers(aligned_dir, questions),
        strict=True,
    ):
        a, b = answer_question(q)
        good, restated = f"{a} plus {b} is {a + b}", f"{a} plus {b} is "
        row: dict = {"prompt": q}
        for name, answer in (("base", base), ("aligned", aligned)):
            row[name] = answer
            row[f"{name}_correct"] = answer == good
            row[f"{name}_faithful"] = answer.startswith(restated)
        rows.append(row)
    return rows


def answers_table(rows: list[dict]) -> str:
    """The before/after greedy answers as text columns (``ok``: the preferred answer, a faithful
    restatement with the right sum)."""
    w = max(len(r["prompt"]) for r in rows)
    v = max(len(r["base"]) for r in rows) + 3
    lines = [f"{'held-out question':<{w}}  {'base model':<{v}}  aligned (SimPO)"]
    for r in rows:
        base = r["base"] + (" ok" if r["base_correct"] else "")
        aligned = r["aligned"] + (" ok" if r["aligned_correct"] else "")
        lines.append(f"{r['prompt']:<{w}}  {base:<{v}}  {aligned}")
    n = len(rows)
    for what, key in (("faithful restatements", "faithful"), ("preferred answers", "correct")):
        nb, na = (sum(r[f"{m}_{key}"] for r in rows) for m in ("base", "aligned"))
        lines.append(f"{what + ':':<23}{nb:>3}/{n} -> {na}/{n}")
    return "\n".join(lines)


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
    heldout = [
        "--data-path",
        "examples/tiny/heldout.jsonl",
        "--micro-batch-size",
        "30",
        *cache,
        *loss_flags(REPO / "examples/tiny/simpo.yaml"),
    ]
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
    # Before/after on the held-out questions, both models loaded by transformers: the shipped
    # base and the export of the trained checkpoint.
    answers = compare_answers(
        REPO / "examples/tiny", out / "hf", REPO / "examples/tiny/heldout.jsonl"
    )
    (out / "answers.json").write_text(json.dumps(answers, indent=1))
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    acc = f"{before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}"
    print(f"""
==================== megatron-simpo demo ({time.time() - start:.0f} s) ====================
{answers_table(answers)}

held-out preference accuracy: {acc}
held-out reward margin:       {before["rewards/margins"]:+.3f} -> {after["rewards/margins"]:+.3f}
held-out SimPO loss:          {before["loss"]:.3f} -> {after["loss"]:.3f}
({before["num_pairs"]} held-out pairs; their questions are not in the preference training data)

checkpoints:  {rel}/init (imported), {rel}/ckpt (trained)
HF export:    {rel}/hf — {loaded_by_transformers(out / "hf")}
evaluations:  {rel}/eval_before.json, {rel}/eval_after.json (per-pair results inside)
answers:      {rel}/answers.json (the table above)
metrics:      {rel}/tb/metrics.jsonl
TensorBoard:  .venv/bin/tensorboard --logdir {rel}/tb   (then open http://localhost:6006)
""")


if __name__ == "__main__":
    main()
