"""Throughput of ``megatron-simpo train`` vs TRL's ``CPOTrainer`` (SimPO loss) on the same job.

One invocation builds a random Llama with ``transformers`` (seeded), saves it, imports it with
``megatron-simpo convert hf-to-mcore`` (so both trainers start from the same weights), writes the
same pre-tokenised pairs for both (lengths drawn from a long-tailed, UltraFeedback-like spread),
then runs, alternately, each trainer for ``--warmup + --steps`` optimizer steps and reports the
pairs/s of the timed steps and the ratio::

    .venv/bin/python benchmarks/bench_vs_trl.py                 # ~3 min per repeat on 2 idle cores
    .venv/bin/python benchmarks/bench_vs_trl.py --repeats 3 --json bench.json

The identical job: the same weights, pairs and pair order (TRL's sampler is made sequential over
the pairs in this trainer's global-batch order, so step ``i`` of both sees the same pairs in the
same micro-batches), the same micro-batch size and gradient accumulation (pairs per step), fp32,
AdamW (lr 1e-6, no weight decay, clip 1.0, constant LR), SimPO with beta 2 and gamma 1 (TRL:
``loss_type="simpo"``, ``cpo_alpha=0``, ``simpo_gamma=1``), 2 CPU threads. The first step's loss
of both is printed as a check that the jobs are the same. Both pad each micro-batch to its longest
sequence (TRL's collator pads chosen and rejected of a batch to their longest).

Timing excludes start-up and the ``--warmup`` steps. Ours: each ``Trainer.step`` (data collation,
forward, backward, optimizer; the interval ``metrics.jsonl`` calls ``iteration_time``), with
``torchrun --nproc-per-node 1`` running this file, which parses the flags with the CLI's own parser
and calls ``megatron_simpo.train.run``: the code path of ``megatron-simpo train``, one process,
``OMP_NUM_THREADS=2``. TRL: the interval between consecutive ``on_step_end`` callbacks (the same
work plus its per-step logging, a few ``.item()`` calls), in its own process with
``torch.set_num_threads(2)``. Both are also timed in process CPU time (all threads): on a shared
machine the wall-clock ratio is noisy and pairs per CPU-second is the steadier comparison of the
work each trainer does. Pairs are token ids, so tokenisation is bypassed on both sides (TRL's
``tokenize_row`` is replaced by one that returns the ids; it runs before training anyway); the
tokenizer object TRL needs (pad id 0) is ``examples/tiny``'s.
Needs ``pip install -e .[bench]`` (trl).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import long_tailed_pairs

REPO = Path(__file__).resolve().parents[1]

#: The model: Llama-3-like proportions (vocab / hidden = 32, GQA 2:1, SwiGLU 3x), CPU-sized.
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
BETA, GAMMA, LR = 2.0, 1.0, 1e-6


def make_pairs(n: int, max_len: int, seed: int) -> list[dict]:
    """Pairs with long-tailed lengths (``synthetic.py``) in the benchmark model's vocabulary."""
    return long_tailed_pairs(n, max_len, MODEL["vocab_size"], seed)


def real_token_fraction(pairs: list[dict], order: list[int], micro: int) -> float:
    """Real tokens / padded tokens when each micro-batch is padded to its longest sequence."""
    real = padded = 0
    for i in range(0, len(order), micro):
        group = [pairs[j] for j in order[i : i + micro]]
        lens = [
            len(p["prompt_ids"]) + len(p[k]) for p in group for k in ("chosen_ids", "rejected_ids")
        ]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return real / padded


def step_order(n: int, global_batch: int, steps: int, seed: int) -> list[int]:
    """Pair indices in this trainer's global-batch order for ``steps`` steps."""
    from megatron_simpo.data.batching import global_batch_indices

    return [i for s in range(steps) for i in global_batch_indices(n, global_batch, s, seed)]


def prepare(work: Path, args) -> None:
    """Random HF Llama -> Megatron checkpoint, and the pairs file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        **MODEL,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(work / "hf")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_simpo",
            "convert",
            "hf-to-mcore",
            "--hf-dir",
            str(work / "hf"),
            "--save",
            str(work / "mcore"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        sys.exit(f"convert failed:\n{r.stderr[-3000:]}")
    pairs = make_pairs(args.num_pairs, args.seq_length, args.seed)
    with open(work / "pairs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")


def train_args(work: Path, args, tb: Path) -> list[str]:
    """``megatron-simpo train`` flags of the job."""
    return [
        "--load",
        str(work / "mcore"),
        "--data-path",
        str(work / "pairs.jsonl"),
        "--data-schema",
        "pretokenized",
        # TRL 1.16 (the side compared) never cuts the prompt: its rule, not TRL 0.27's.
        "--truncation-rule",
        "trl-1",
        "--seq-length",
        str(args.seq_length),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--global-batch-size",
        str(args.global_batch_size),
        "--train-iters",
        str(args.warmup + args.steps),
        "--lr",
        str(LR),
        "--lr-decay-style",
        "constant",
        "--clip-grad",
        "1.0",
        "--beta",
        str(BETA),
        "--simpo-gamma",
        str(GAMMA),
        "--precision",
        "fp32",
        "--seed",
        str(args.seed),
        "--tensorboard-dir",
        str(tb),
        "--log-interval",
        "1",
    ]


def ours_worker(out: Path, argv: list[str]) -> None:
    """Inside torchrun: ``megatron-simpo train`` (the CLI's own parsing and ``train.run``) with
    each ``Trainer.step`` timed in wall and process CPU time."""
    from megatron_simpo import cli
    from megatron_simpo import train as train_mod

    wall: list[float] = []
    cpu: list[float] = []
    step = train_mod.Trainer.step

    def timed_step(self, *a, **k):
        w, c = time.perf_counter(), time.process_time()
        result = step(self, *a, **k)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
        return result

    train_mod.Trainer.step = timed_step
    args = cli.build_parser().parse_args(["train", *argv])
    cfg = cli.config_from_args(args)
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    train_mod.run(cfg)
    if os.environ.get("RANK", "0") == "0":
        out.write_text(json.dumps({"wall": wall, "cpu": cpu}))


#: Our trainer's variants in the comparison: name -> extra ``train`` flags.
BEST = ["--pack-pairs", "--prefix-sharing", "--fused-loss-head"]
OURS = {"ours": [], "packed": BEST}


def computed_token_share(
    pairs: list[dict], args, steps: range, pack: bool, prefix_sharing: bool
) -> float:
    """Real tokens (each pair's prompt once, its chosen and rejected responses; no padding)
    over the token positions our trainer computes in ``steps``, from the micro-batches its own
    batcher builds (padded layout, or packed rows with ``pack`` / ``prefix_sharing``)."""
    from megatron_simpo.data.batching import PairBatcher, global_batch_indices

    objs = [_pair(p) for p in pairs]
    batcher = PairBatcher(
        objs,
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=args.seed,
        pack_pairs=pack,
        prefix_sharing=prefix_sharing,
        capacity=args.seq_length,
    )
    real = computed = 0
    for it in steps:
        idx = global_batch_indices(len(objs), args.global_batch_size, it, args.seed)
        real += sum(_real_tokens(pairs[i]) for i in idx)
        computed += sum(mb["tokens"].numel() for mb in batcher.micro_batches(it)[0])
    return real / computed


def trl_token_share(pairs: list[dict], order: list[int], micro: int) -> float:
    """The same for TRL's ``CPOTrainer``: each micro-batch's chosen and rejected sequences
    (prompt + response, the prompt in both) concatenated and padded to the longest."""
    real = computed = 0
    for i in range(0, len(order), micro):
        group = [pairs[j] for j in order[i : i + micro]]
        lens = [
            len(p["prompt_ids"]) + len(p[k]) for p in group for k in ("chosen_ids", "rejected_ids")
        ]
        real += sum(_real_tokens(p) for p in group)
        computed += max(lens) * len(lens)
    return real / computed


def _real_tokens(p: dict) -> int:
    return len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])


def _pair(p: dict):
    from megatron_simpo.data.batching import Pair

    return Pair(tuple(p["prompt_ids"]), tuple(p["chosen_ids"]), tuple(p["rejected_ids"]))


def run_ours(work: Path, args, tag: str, extra: list[str] | None = None) -> dict:
    tb = work / f"tb-{tag}"
    out = work / f"ours-{tag}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "1",
        "--master-port",
        str(20000 + random.randrange(10000)),
        __file__,
        "--side",
        "ours",
        "--json",
        str(out),
        "--",
        *train_args(work, args, tb),
        *(extra or []),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MEGATRON_SIMPO_CACHE": str(work / "cache"),
    }
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"megatron-simpo train failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
    t = json.loads(out.read_text())
    # metrics.jsonl's iteration_time is the same interval as "wall" (Trainer.step); a check.
    return {
        "wall": t["wall"][args.warmup :],
        "cpu": t["cpu"][args.warmup :],
        "first_loss": rows[0]["loss"],
    }


def trl_worker(work: Path, args, out: Path) -> None:
    """TRL CPOTrainer in this process (``--side trl``); writes step times to ``out``."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pairs = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    steps = args.warmup + args.steps
    order = step_order(len(pairs), args.global_batch_size, steps, args.seed)
    rows = [{"prompt": "-", "chosen": "-", "rejected": "-", **pairs[i]} for i in order]

    class IdsCPOTrainer(CPOTrainer):
        """Takes the pairs' token ids as they are (the same ids our trainer reads)."""

        def tokenize_row(self, feature, model=None) -> dict:
            p, out = feature["prompt_ids"], {}
            for k in ("chosen", "rejected"):
                ids = p + feature[f"{k}_ids"]
                out[f"{k}_input_ids"] = ids
                out[f"{k}_attention_mask"] = [1] * len(ids)
                out[f"{k}_labels"] = [-100] * len(p) + feature[f"{k}_ids"]
            out["prompt_input_ids"], out["prompt_attention_mask"] = p, [1] * len(p)
            return out

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    wall: list[float] = []
    cpu: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        last: tuple[float, float] | None = None

        def on_step_end(self, a, state, control, **kw):
            now = (time.perf_counter(), time.process_time())
            if self.last is not None:
                wall.append(now[0] - self.last[0])
                cpu.append(now[1] - self.last[1])
            self.last = now

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    timer = Timer()
    model = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    config = CPOConfig(
        output_dir=str(work / "trl-out"),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=BETA,
        simpo_gamma=GAMMA,
        max_length=args.seq_length,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=args.seed,
    )
    trainer = IdsCPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(REPO / "examples/tiny"),
        callbacks=[timer],
    )
    # The first on_step_end closes step 1 (untimed: it also started the clock).
    trainer.train()
    k = args.warmup - 1
    out.write_text(json.dumps({"wall": wall[k:], "cpu": cpu[k:], "first_loss": losses[0]}))


def run_trl(work: Path, args, tag: str) -> dict:
    out = work / f"trl-{tag}.json"
    cmd = [sys.executable, __file__, "--side", "trl", "--work", str(work), "--json", str(out)]
    for k in (
        "seed",
        "seq_length",
        "micro_batch_size",
        "global_batch_size",
        "warmup",
        "steps",
        "threads",
        "num_pairs",
    ):
        cmd += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"TRL run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-length", type=int, default=256, help="longest prompt+response")
    ap.add_argument("--micro-batch-size", type=int, default=2, help="pairs per micro-batch (both)")
    ap.add_argument("--global-batch-size", type=int, default=8, help="pairs per step (both)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each trainer, alternating")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each trainer")
    ap.add_argument("--num-pairs", type=int, default=256, help="pairs in the synthetic set")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--side", choices=["trl", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.side == "ours":
        ours_worker(Path(args.json), [a for a in rest if a != "--"])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.warmup < 1:
        sys.exit("--warmup must be >= 1 (the first step includes one-time set-up)")
    if args.side == "trl":
        trl_worker(Path(args.work), args, Path(args.json))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        pairs = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
        order = step_order(len(pairs), args.global_batch_size, args.warmup + args.steps, args.seed)
        timed = order[args.warmup * args.global_batch_size :]
        frac = real_token_fraction(pairs, timed, args.micro_batch_size)
        frac_one = real_token_fraction(pairs, timed, args.global_batch_size)
        timed_steps = range(args.warmup, args.warmup + args.steps)
        from megatron_simpo.defaults import resolve_packing

        share = {
            # The defaults as training resolves them on this machine (no TE: both on).
            "ours": computed_token_share(
                pairs,
                args,
                timed_steps,
                resolve_packing(None, "--pack-pairs", "auto", False)[0],
                resolve_packing(None, "--prefix-sharing", "auto", False)[0],
            ),
            "packed": computed_token_share(pairs, args, timed_steps, True, True),
            "trl": trl_token_share(pairs, timed, args.micro_batch_size),
        }
        runs = []
        for rep in range(args.repeats):
            results = {k: run_ours(work, args, f"{k}{rep}", v) for k, v in OURS.items()}
            results["trl"] = run_trl(work, args, str(rep))
            g = args.global_batch_size
            res = {}
            for name, t in results.items():
                res[f"{name}_first_loss"] = t["first_loss"]
                res[f"{name}_pairs_per_s"] = g / statistics.mean(t["wall"])
                res[f"{name}_pairs_per_cpu_s"] = g / statistics.mean(t["cpu"])
                res[f"{name}_wall"], res[f"{name}_cpu"] = t["wall"], t["cpu"]
            res["ratio"] = res["ours_pairs_per_s"] / res["trl_pairs_per_s"]
            res["cpu_ratio"] = res["ours_pairs_per_cpu_s"] / res["trl_pairs_per_cpu_s"]
            res["packed_ratio"] = res["packed_pairs_per_s"] / res["trl_pairs_per_s"]
            res["packed_cpu_ratio"] = res["packed_pairs_per_cpu_s"] / res["trl_pairs_per_cpu_s"]
            runs.append(res)
            print(
                f"run {rep + 1}: ours {res['ours_pairs_per_s']:.3f} pairs/s, best "
                f"{res['packed_pairs_per_s']:.3f}, TRL {res['trl_pairs_per_s']:.3f}; ratio "
                f"{res['ratio']:.2f}x / best {res['packed_ratio']:.2f}x (per CPU-second "
                f"{res['cpu_ratio']:.2f}x / {res['packed_cpu_ratio']:.2f}x); step-1 loss ours "
                f"{res['ours_first_loss']:.6f}, best {res['packed_first_loss']:.6f}, "
                f"TRL {res['trl_first_loss']:.6f}",
                flush=True,
            )
    print(
        f"\nmodel {MODEL}, fp32, {args.threads} threads; {args.global_batch_size} pairs/step in "
        f"micro-batches of {args.micro_batch_size}; {args.steps} timed steps after {args.warmup}; "
        f"real tokens {frac:.0%} of padded (micro-batch padding; {frac_one:.0%} if one batch of "
        f"{args.global_batch_size} were padded together)"
    )
    g = args.global_batch_size
    print(f"ours best: {' '.join(BEST)}; real tokens: each pair's prompt once and its responses")
    head = f"{'trainer':<16} {'pairs/s median':>15} {'min':>7} {'max':>7} {'pairs/CPU-s':>12}"
    print(f"{head} {'x TRL':>6} {'real tokens':>12}")
    names = (("ours", "megatron-simpo"), ("packed", "ours best"), ("trl", "TRL CPOTrainer"))
    trl_median = statistics.median(r["trl_pairs_per_s"] for r in runs)
    for key, name in names:
        v = [r[f"{key}_pairs_per_s"] for r in runs]
        c = statistics.median(r[f"{key}_pairs_per_cpu_s"] for r in runs)
        m = statistics.median(v)
        print(
            f"{name:<16} {m:>15.3f} {min(v):>7.3f} {max(v):>7.3f} {c:>12.3f} "
            f"{m / trl_median:>5.2f}x {share[key]:>12.0%}"
        )
    # Step i holds the same pairs in every run: its fastest time over the runs is the one least
    # disturbed by other load on the machine.
    best = {
        k: g * args.steps / sum(min(r[f"{k}_wall"][i] for r in runs) for i in range(args.steps))
        for k in ("ours", "packed", "trl")
    }
    print(
        f"best of {len(runs)} run(s) per step: ours {best['ours']:.3f} pairs/s, best "
        f"{best['packed']:.3f}, TRL {best['trl']:.3f} pairs/s, ratio "
        f"{best['ours'] / best['trl']:.2f}x, best {best['packed'] / best['trl']:.2f}x"
    )
    ratios = (("ratio", "wall-clock"), ("cpu_ratio", "per CPU-second"))
    ratios += (("packed_ratio", "best, wall-clock"), ("packed_cpu_ratio", "best, per CPU-s"))
    for key, what in ratios:
        v = [r[key] for r in runs]
        print(
            f"ratio ours / TRL ({what}): median {statistics.median(v):.2f}x, "
            f"range {min(v):.2f}-{max(v):.2f}x over {len(runs)} run(s)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "model": MODEL,
                    "real_token_fraction": frac,
                    "computed_real_token_share": share,
                    "runs": runs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
