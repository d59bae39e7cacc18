"""What train/evaluate check of the data they read, and preparation before the process group."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import REPO

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.data import ensure_prepared, pairs_for, prepare_for_run
from megatron_simpo.data.prepare import PrepareOptions, prepare
from megatron_simpo.errors import DataError

TINY = REPO / "examples" / "tiny"  # its tokenizer has 30 ids, the model 30 too


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids_rows(n: int, seed: int = 0) -> list[dict]:
    """Pre-tokenised pairs of uneven lengths with ids in [3, 30) and non-unit weights."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lp, lc, lr = rng.randint(2, 9), rng.randint(1, 7), rng.randint(1, 7)
        rows.append(
            {
                "prompt_ids": [1] + [rng.randrange(3, 30) for _ in range(lp)],
                "chosen_ids": [rng.randrange(3, 30) for _ in range(lc)] + [2],
                "rejected_ids": [rng.randrange(3, 30) for _ in range(lr - 1)] + [29, 2],
                "weight": round(rng.uniform(0.1, 3.0), 3),
            }
        )
    return rows


def cfg_for(seq_length: int = 48, tokenizer: str | None = str(TINY)) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig.from_hf_config(TINY)
    cfg.data.tokenizer = tokenizer
    cfg.train.seq_length = seq_length
    return cfg


def prepared(tmp_path, rows, name="p", tokenizer=str(TINY), **opts):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / name
    prepare(src, out, tokenizer=tokenizer, opts=PrepareOptions(**opts), quiet=True)
    return src, str(out)


def test_prepared_with_a_longer_max_length_is_refused(tmp_path):
    _, out = prepared(tmp_path, ids_rows(6), max_length=64)
    with pytest.raises(DataError) as e:
        pairs_for(cfg_for(seq_length=32), out)
    assert str(e.value) == (
        f"{out} was prepared with --max-length 64 but --seq-length is 32: re-run prepare "
        "with --max-length 32 or raise --seq-length"
    )
    assert len(pairs_for(cfg_for(seq_length=64), out)) == 6


def test_prepared_without_max_length_is_checked_pair_by_pair(tmp_path):
    rows = ids_rows(5)
    rows[3] = {**rows[3], "prompt_ids": [1] + [5] * 20, "chosen_ids": [6] * 9 + [2]}  # 31 tokens
    src, out = prepared(tmp_path, rows)
    with pytest.raises(DataError, match=rf"{src}:4 \(in .*\): a pair of 31 tokens does not fit"):
        pairs_for(cfg_for(seq_length=30), out)
    assert len(pairs_for(cfg_for(seq_length=31), out)) == 5


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """The tiny tokenizer with two ids swapped: same size, other ids."""
    d = tmp_path_factory.mktemp("other_tok")
    for f in ("tokenizer_config.json",):
        (d / f).write_text((TINY / f).read_text())
    tok = json.loads((TINY / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["what"], vocab["plus"] = vocab["plus"], vocab["what"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return str(d)


def test_prepared_with_another_tokenizer_is_refused(tmp_path, other_tokenizer):
    text = [{"prompt": "what is 1 plus 2 ?", "chosen": " 3", "rejected": " 4"}]
    _, out = prepared(tmp_path, text, tokenizer=other_tokenizer)
    with pytest.raises(DataError, match="prepared with tokenizer .* but this run's tokenizer") as e:
        pairs_for(cfg_for(), out)
    assert f"re-run prepare with --tokenizer {TINY}" in str(e.value)
    assert len(pairs_for(cfg_for(tokenizer=other_tokenizer), out)) == 1
    assert len(pairs_for(cfg_for(tokenizer=None), out)) == 1  # nothing to compare with


def test_ids_beyond_the_model_vocabulary_are_refused_for_prepared_dirs(tmp_path):
    rows = ids_rows(7, seed=3)
    rows[5] = {**rows[5], "chosen_ids": [4, 31, 2]}
    src, out = prepared(tmp_path, rows, tokenizer=None)  # nothing bounds the ids at prepare
    with pytest.raises(DataError) as e:
        pairs_for(cfg_for(), out)
    assert str(e.value).startswith(f"{src}:6 (in {out}): field 'chosen_ids' holds id 31")
    assert "outside the model's vocabulary [0, 30)" in str(e.value)


def test_bad_weights_in_a_prepared_dir_are_refused(tmp_path):
    import datasets

    src, out = prepared(tmp_path, ids_rows(4), tokenizer=None)
    ds = datasets.load_from_disk(f"{out}/pairs")
    w = list(ds["weight"])
    w[2] = float("nan")
    ds = ds.remove_columns("weight").add_column("weight", w)
    ds.save_to_disk(str(tmp_path / "tmp_pairs"))
    import shutil

    shutil.rmtree(f"{out}/pairs")
    shutil.move(str(tmp_path / "tmp_pairs"), f"{out}/pairs")
    with pytest.raises(DataError, match=rf"{src}:3 .*weight nan is not a finite number >= 0"):
        pairs_for(cfg_for(), out)


def test_old_prepared_dirs_warn_but_are_still_checked(tmp_path):
    _, out = prepared(tmp_path, ids_rows(3), tokenizer=None)
    info = json.loads((tmp_path / "p" / "prepared.json").read_text())
    info["version"] = 1
    (tmp_path / "p" / "prepared.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="prepared by an older megatron-simpo"):
        assert len(pairs_for(cfg_for(), out)) == 3


def test_train_prepares_raw_data_before_the_process_group(tmp_path, monkeypatch):
    """``train`` must tokenise before ``init_process_group``: a barrier under its timeout
    killed jobs whose rank 0 tokenised a large dataset."""
    from megatron_simpo import parallel, train

    cfg = cfg_for()
    cfg.data.data_path = write_jsonl(tmp_path / "raw.jsonl", ids_rows(5))
    cfg.data.data_cache_dir = str(tmp_path / "cache")
    seen = {}

    class Stop(Exception):
        pass

    def init_distributed(*_a, **_k):
        seen["entries"] = len(list((tmp_path / "cache").glob("*/prepared.json")))
        raise Stop

    monkeypatch.setattr(parallel, "init_distributed", init_distributed)
    with pytest.raises(Stop):
        train.run(cfg)
    assert seen["entries"] == 1


def test_other_ranks_wait_for_rank_0_without_a_collective(tmp_path, monkeypatch):
    import megatron_simpo.data as data

    src = write_jsonl(tmp_path / "raw.jsonl", ids_rows(6))
    opts = PrepareOptions(max_length=32)
    real_prepare = data.prepare
    started = threading.Event()

    def slow_prepare(*a, **k):  # rank 0 tokenising for a while
        started.set()
        time.sleep(3)
        return real_prepare(*a, **k)

    monkeypatch.setattr(data, "prepare", slow_prepare)
    kw = {"tokenizer": None, "opts": opts, "cache_dir": str(tmp_path / "c")}
    got = {}

    def rank(r):
        got[r] = ensure_prepared(src, rank=r, stale_s=60, **kw)

    t0 = threading.Thread(target=rank, args=(0,))
    t0.start()
    started.wait(10)
    t1 = threading.Thread(target=rank, args=(1,))
    t1.start()
    t0.join(60)
    t1.join(60)
    assert got[0] == got[1] and (got[1] / "prepared.json").is_file()


def test_a_failure_on_rank_0_reaches_the_waiting_ranks(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt_ids": [1], "chosen_ids": []}])
    kw = {"tokenizer": None, "opts": PrepareOptions(), "cache_dir": str(tmp_path / "c")}
    errors = {}

    def rank(r):
        try:
            ensure_prepared(src, rank=r, stale_s=30, **kw)
        except DataError as e:
            errors[r] = str(e)

    waiter = threading.Thread(target=rank, args=(1,))
    waiter.start()
    time.sleep(1.5)  # the waiter has polled once: the failure it sees is this run's
    rank(0)
    waiter.join(30)
    assert "missing field(s) ['rejected_ids']" in errors[0]
    assert errors[1] == errors[0]


def test_a_cache_not_shared_with_rank_0_is_named(tmp_path):
    src = write_jsonl(tmp_path / "raw.jsonl", ids_rows(2))
    with pytest.raises(DataError, match="must be on a filesystem shared by all nodes"):
        ensure_prepared(
            src,
            tokenizer=None,
            opts=PrepareOptions(),
            cache_dir=str(tmp_path / "c"),
            rank=1,
            stale_s=2,
        )


def test_prepare_for_run_prepares_train_and_eval_paths(tmp_path):
    cfg = cfg_for()
    cfg.data.data_path = write_jsonl(tmp_path / "a.jsonl", ids_rows(4))
    cfg.data.eval_data_path = write_jsonl(tmp_path / "b.jsonl", ids_rows(3, seed=1))
    cfg.data.data_cache_dir = str(tmp_path / "cache")
    prepare_for_run(cfg)
    assert len(list((tmp_path / "cache").glob("*/prepared.json"))) == 2
    assert len(pairs_for(cfg, cfg.data.eval_data_path)) == 3
