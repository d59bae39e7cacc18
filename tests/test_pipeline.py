"""The preference-data pipeline: schemas, tokenisation, truncation, bad rows, sources, cache."""

from __future__ import annotations

import json
import time

import pytest
from conftest import REPO

from megatron_simpo.data import PreparedPairs, load_pairs
from megatron_simpo.data.prepare import PrepareOptions, prepare
from megatron_simpo.errors import DataError

TINY = str(REPO / "examples/tiny")  # word-level tokenizer with a chat template; BOS 1, EOS 2


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def write_jsonl(path, rows):
    path.write_bytes(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    )
    return str(path)


def run(tmp_path, rows, tokenizer=TINY, name="d.jsonl", **opts) -> PreparedPairs:
    src = write_jsonl(tmp_path / name, rows)
    out = tmp_path / ("out_" + name)
    prepare(src, out, tokenizer=tokenizer, opts=PrepareOptions(**opts), quiet=True)
    return PreparedPairs(out)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


TEXT = {"prompt": "what is 1 plus 2 ?", "chosen": " 1 plus 2 is 3", "rejected": " 3"}


def test_text_pairs_follow_trl_conventions(tmp_path, tok):
    (p,) = run(tmp_path, [TEXT])
    assert p.prompt_ids == tuple([tok.bos_token_id] + ids(tok, TEXT["prompt"]))  # BOS once
    assert p.chosen_ids == tuple(ids(tok, "1 plus 2 is 3") + [tok.eos_token_id])  # EOS added
    assert p.rejected_ids == tuple(ids(tok, "3") + [tok.eos_token_id])


def test_bos_and_eos_are_not_doubled(tmp_path, tok):
    row = {"prompt": "<s> what is 1 plus 2 ?", "chosen": " 3 </s>", "rejected": " 4 </s>"}
    (p,) = run(tmp_path, [row])
    assert p.prompt_ids.count(tok.bos_token_id) == 1 and p.prompt_ids[0] == tok.bos_token_id
    assert p.chosen_ids == tuple(ids(tok, "3") + [tok.eos_token_id])


def test_conversation_uses_the_chat_template_and_scores_only_the_answer(tmp_path, tok):
    user = {"role": "user", "content": "what is 1 plus 2 ?"}
    full = {
        "chosen": [user, {"role": "assistant", "content": "1 plus 2 is 3"}],
        "rejected": [user, {"role": "assistant", "content": "1 plus 2 is 4"}],
    }
    answer_only = {
        "prompt": "what is 1 plus 2 ?",
        "chosen": [{"role": "assistant", "content": "1 plus 2 is 3"}],
        "rejected": [{"role": "assistant", "content": "1 plus 2 is 4"}],
    }
    a, b = run(tmp_path, [full, answer_only])
    assert a == b
    assert tok.decode(a.prompt_ids) == "<s> user: what is 1 plus 2 ? assistant:"
    assert tok.decode(a.chosen_ids) == "1 plus 2 is 3 </s>"


def test_multi_turn_scores_only_the_final_assistant_turn(tmp_path, tok):
    turns = [
        {"role": "system", "content": "what"},
        {"role": "user", "content": "what is 1 plus 1 ?"},
        {"role": "assistant", "content": "1 plus 1 is 2"},
        {"role": "user", "content": "what is 2 plus 2 ?"},
    ]
    row = {
        "chosen": turns + [{"role": "assistant", "content": "2 plus 2 is 4"}],
        "rejected": turns + [{"role": "assistant", "content": "5"}],
    }
    (p,) = run(tmp_path, [row])
    prompt = tok.decode(p.prompt_ids)
    assert prompt.startswith("<s> system: what user: what is 1 plus 1 ?")
    assert "assistant: 1 plus 1 is 2" in prompt  # earlier answers are context, not scored
    assert prompt.endswith("user: what is 2 plus 2 ? assistant:")
    assert tok.decode(p.chosen_ids) == "2 plus 2 is 4 </s>"
    assert tok.decode(p.rejected_ids) == "5 </s>"


#: A Qwen3-style chat template (written for this test): ChatML turns; an assistant turn after the
#: last user turn gets a ``<think>`` block (its reasoning, split off the content, or empty);
#: earlier assistant turns lose theirs.
QWEN3_STYLE_TEMPLATE = """
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}
{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {%- set answer = m.content.split('</think>')[-1].lstrip('\n') -%}
    {%- set thought = '' -%}
    {%- if '</think>' in m.content -%}
      {%- set thought = m.content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if loop.index0 > ns.last_user -%}{{- '<think>\n' + thought + '\n</think>\n\n' -}}
    {%- endif -%}
    {{- answer + '<|im_end|>\n' -}}
  {%- else -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A character-level tokenizer with ChatML/think special tokens and the Qwen3-style
    template; EOS is ``<|im_end|>`` (as in Qwen3's chat models), no BOS."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
    chars = sorted(set(string.ascii_lowercase + string.digits + " \n?+="))
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + chars)}, "<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    t.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = QWEN3_STYLE_TEMPLATE
    out = tmp_path_factory.mktemp("qwen3_tok")
    fast.save_pretrained(out)
    return str(out)


def test_qwen3_think_blocks_response_is_the_final_turn_as_generated(tmp_path, qwen3_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    history = [
        {"role": "user", "content": "what is 1+1?"},
        {"role": "assistant", "content": "<think>\nadd one\n</think>\n\n1+1=2"},
        {"role": "user", "content": "and 2+2?"},
    ]
    chosen = {"role": "assistant", "content": "<think>\n2 and 2\n</think>\n\n4"}
    rejected = {"role": "assistant", "content": "5"}
    (p,) = run(
        tmp_path, [{"chosen": history + [chosen], "rejected": history + [rejected]}], qwen3_dir
    )
    # The prompt is what generation starts from (the earlier turn's think block dropped by the
    # template, as at generation time).
    gen_prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert "think" not in gen_prompt and gen_prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert p.prompt_ids == tuple(ids(tok, gen_prompt))
    # The response is the final turn with its think block (an empty one when the answer has
    # none), up to and including <|im_end|>: not the newline after it, not a second EOS.
    assert p.chosen_ids == tuple(ids(tok, "<think>\n2 and 2\n</think>\n\n4<|im_end|>"))
    assert p.rejected_ids == tuple(ids(tok, "<think>\n\n</think>\n\n5<|im_end|>"))
    # Prompt + response is the template's own rendering of the conversation, up to that EOS.
    full = tok.apply_chat_template(history + [chosen], tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert p.prompt_ids + p.chosen_ids == tuple(ids(tok, full[:-1]))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A BPE tokenizer that merges 'a'+'b' across the prompt/response boundary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "x": 2, "a": 3, "b": 4, "c": 5, "ab": 6}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(out)
    return str(out)


def test_boundary_merge_moves_the_split_left(tmp_path, bpe_dir):
    # enc("xa") = [x, a] but enc("xab") = [x, ab]: the shared prompt becomes [BOS, x].
    (p,) = run(tmp_path, [{"prompt": "xa", "chosen": "b", "rejected": "c"}], tokenizer=bpe_dir)
    assert p.prompt_ids == (0, 2)
    assert p.chosen_ids == (6, 1)  # "ab" + EOS
    assert p.rejected_ids == (3, 5, 1)  # "a", "c" + EOS
    # prompt + response is exactly the tokenised text (after BOS, before EOS)
    assert p.prompt_ids[1:] + p.chosen_ids[:-1] == (2, 6)


def long_ids_row(n_prompt, n_chosen, n_rejected):
    return {
        "prompt_ids": [1] + list(range(10, 10 + n_prompt - 1)),
        "chosen_ids": list(range(100, 100 + n_chosen)),
        "rejected_ids": list(range(200, 200 + n_rejected)),
    }


def test_truncation_trl_rule_cuts_responses_to_max_length_minus_max_prompt_length(tmp_path):
    # TRL <= 0.27 / SimPO: the prompt to its last 5 tokens (BOS lost, as there), then every
    # response to 12 - 5 = 7 tokens; the budget a short prompt leaves is not used.
    row = long_ids_row(10, 8, 3)
    (p,) = run(tmp_path, [row], tokenizer=None, max_length=12, max_prompt_length=5)
    assert p.prompt_ids == (14, 15, 16, 17, 18)
    assert p.chosen_ids == tuple(range(100, 107)) and p.rejected_ids == (200, 201, 202)
    short = long_ids_row(3, 11, 2)  # prompt under the limit, the pair over: 14 > 12
    (q,) = run(
        tmp_path, [short], tokenizer=None, name="s.jsonl", max_length=12, max_prompt_length=5
    )
    assert q.prompt_ids == (1, 10, 11) and q.chosen_ids == tuple(range(100, 107))
    (f,) = run(
        tmp_path,
        [short],
        tokenizer=None,
        name="f.jsonl",
        max_length=12,
        max_prompt_length=5,
        truncation_rule="fill",
    )
    assert f.chosen_ids == tuple(range(100, 109))  # fill: 12 - 3 = 9 tokens


def test_truncation_fill_keep_end_keeps_bos_then_fills(tmp_path):
    row = long_ids_row(10, 8, 3)
    (p,) = run(
        tmp_path, [row], tokenizer=None, max_length=12, max_prompt_length=5, truncation_rule="fill"
    )
    assert p.prompt_ids == (1, 15, 16, 17, 18)  # BOS kept, then the prompt's last 4 tokens
    assert p.chosen_ids == tuple(range(100, 107))  # 12 - 5 = 7 tokens
    assert p.rejected_ids == (200, 201, 202)


def test_truncation_trl1_never_cuts_the_prompt(tmp_path):
    rows = [long_ids_row(6, 9, 3), long_ids_row(13, 2, 2)]
    summary = prepare(
        write_jsonl(tmp_path / "t1.jsonl", rows),
        tmp_path / "o",
        tokenizer=None,
        opts=PrepareOptions(max_length=12, max_prompt_length=5, truncation_rule="trl-1"),
        quiet=True,
    )
    (p,) = PreparedPairs(tmp_path / "o")
    assert len(p.prompt_ids) == 6 and p.chosen_ids == tuple(range(100, 106))
    assert summary["dropped"] == {"empty_after_truncation": 1}  # a 13-token prompt fills it


def test_truncation_keep_start_and_no_cut_when_it_fits(tmp_path):
    row = long_ids_row(10, 8, 3)
    for rule in ("trl", "fill"):
        (p,) = run(
            tmp_path,
            [row],
            tokenizer=None,
            name=f"{rule}.jsonl",
            max_length=12,
            max_prompt_length=5,
            truncation_mode="keep_start",
            truncation_rule=rule,
        )
        assert p.prompt_ids == (1, 10, 11, 12, 13) and len(p.chosen_ids) == 7
    (q,) = run(tmp_path, [row], tokenizer=None, name="fits.jsonl", max_length=18)
    assert len(q.prompt_ids) == 10 and len(q.chosen_ids) == 8


def test_pairs_tied_after_truncation_are_dropped_and_counted(tmp_path):
    # Responses that differ only after their 4th token: identical once cut to 8 - 4 = 4.
    tied = {
        "prompt_ids": [1, 5, 6],
        "chosen_ids": [7, 8, 9, 3, 11, 2],
        "rejected_ids": [7, 8, 9, 3],
    }
    tied_long = {**tied, "rejected_ids": [7, 8, 9, 3, 12, 13, 2]}
    apart = {**tied, "rejected_ids": [7, 8, 4, 3, 12, 2]}
    src = write_jsonl(tmp_path / "t.jsonl", [tied, tied_long, apart])
    opts = PrepareOptions(max_length=8, max_prompt_length=4)
    summary = prepare(src, tmp_path / "o", tokenizer=None, opts=opts, quiet=True)
    assert summary["kept"] == 1 and summary["dropped"] == {"tie_after_truncation": 2}
    assert PreparedPairs(tmp_path / "o").source_rows() == [2]
    kept = prepare(
        src,
        tmp_path / "o2",
        tokenizer=None,
        opts=PrepareOptions(max_length=8, max_prompt_length=4, keep_ties=True),
        quiet=True,
    )
    assert kept["kept"] == 3


def test_text_pairs_that_tokenise_identically_are_ties(tmp_path):
    # Different texts, same ids (the word-level tokenizer splits on whitespace).
    row = {"prompt": "what is 1 plus 2 ?", "chosen": " 3", "rejected": "  3"}
    summary = prepare(
        write_jsonl(tmp_path / "w.jsonl", [row, TEXT]),
        tmp_path / "o",
        tokenizer=TINY,
        opts=PrepareOptions(),
        quiet=True,
    )
    assert summary["kept"] == 1 and summary["dropped"] == {"tie": 1}


@pytest.mark.parametrize("weight", ["-0.5", "NaN", "Infinity", "-Infinity", "1e999", "true"])
def test_negative_or_non_finite_weights_are_refused_with_file_line(tmp_path, weight):
    good = json.dumps({**long_ids_row(3, 2, 2), "rejected_ids": [7, 2], "weight": 0.25})
    bad = good.replace('"weight": 0.25', f'"weight": {weight}')
    src = write_jsonl(tmp_path / "w.jsonl", [good.encode(), bad.encode()])
    with pytest.raises(DataError, match="'weight' must be a finite number >= 0") as e:
        prepare(src, tmp_path / "o", tokenizer=None, opts=PrepareOptions(), quiet=True)
    assert f"{src}:2:" in str(e.value)


def test_pretokenised_ids_beyond_the_tokenizer_are_refused(tmp_path, tok):
    n = len(tok)  # 30 ids in the tiny tokenizer
    rows = [
        {"prompt_ids": [1, 5], "chosen_ids": [3, 2], "rejected_ids": [4, 2]},
        {"prompt_ids": [1, 5], "chosen_ids": [3, 2], "rejected_ids": [4, n + 3, 2]},
    ]
    src = write_jsonl(tmp_path / "oov.jsonl", rows)
    with pytest.raises(DataError, match=rf"'rejected_ids'\[1\] = {n + 3} is outside the tokenizer"):
        prepare(src, tmp_path / "o", tokenizer=TINY, opts=PrepareOptions(), quiet=True)
    with pytest.raises(DataError, match=f"{src}:2:"):
        prepare(src, tmp_path / "o", tokenizer=TINY, opts=PrepareOptions(), quiet=True)
    # Without a tokenizer nothing bounds them here; train checks them against the model.
    prepare(src, tmp_path / "o", tokenizer=None, opts=PrepareOptions(), quiet=True)


def test_summary_counts_ties_and_truncation(tmp_path):
    rows = [
        long_ids_row(3, 2, 2),
        {**long_ids_row(3, 2, 2), "rejected_ids": [100, 101]},
        long_ids_row(10, 8, 3),
    ]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    summary = prepare(
        src,
        tmp_path / "o",
        tokenizer=None,
        opts=PrepareOptions(max_length=12, max_prompt_length=5),
        quiet=True,
    )
    assert summary["rows"] == 3 and summary["kept"] == 2
    assert summary["dropped"] == {"tie": 1} and summary["truncated"] == 1
    kept = PreparedPairs(tmp_path / "o")
    assert kept.source_rows() == [0, 2]
    summary = prepare(
        src, tmp_path / "o2", tokenizer=None, opts=PrepareOptions(keep_ties=True), quiet=True
    )
    assert summary["kept"] == 3


USER = {"role": "user", "content": "what is 1 plus 2 ?"}
ASST = {"role": "assistant", "content": "3"}


@pytest.mark.parametrize(
    "row,message",
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        ({"prompt": "what", "chosen": "3"}, r"missing field\(s\) \['rejected'\]"),
        ({"prompt": "what", "chosen": 3, "rejected": "4"}, "'chosen' must be a string"),
        ({"prompt": "what", "chosen": "  ", "rejected": "4"}, "'chosen' is empty"),
        (
            {"chosen": [USER, {"role": "robot", "content": "3"}], "rejected": [USER, ASST]},
            "role 'robot'",
        ),
        (
            {"chosen": [ASST, USER, ASST], "rejected": [ASST, USER, ASST]},
            "expected 'user' at turn 1",
        ),
        ({"chosen": [USER], "rejected": [USER]}, "the final message must be the assistant"),
        (
            {
                "chosen": [USER, ASST],
                "rejected": [{"role": "user", "content": "what is 2 ?"}, ASST],
            },
            "must share the same prompt",
        ),
        (
            {"chosen": [USER, {"role": "assistant", "content": ""}], "rejected": [USER, ASST]},
            r"chosen\[1\].content is empty",
        ),
        (
            {"prompt_ids": [1, 5], "chosen_ids": [3, -1], "rejected_ids": [4]},
            r"'chosen_ids'\[1\] = -1 is outside the vocabulary",
        ),
        (
            {"prompt_ids": [1, 5], "chosen_ids": [3, 500], "rejected_ids": [4]},
            r"'chosen_ids'\[1\] = 500 is outside",
        ),
        ({"prompt_ids": [1, 5], "chosen_ids": [], "rejected_ids": [4]}, "'chosen_ids' is empty"),
        ({**TEXT, "weight": "heavy"}, "'weight' must be a finite number"),
    ],
)
def test_bad_row_stops_with_file_line_field_and_fix(tmp_path, row, message):
    good = TEXT
    src = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError, match=message) as e:
        prepare(src, tmp_path / "o", tokenizer=TINY, opts=PrepareOptions(vocab_size=30), quiet=True)
    assert f"{src}:3:" in str(e.value) and "--skip-invalid" in str(e.value)


def test_skip_invalid_counts_per_reason(tmp_path):
    rows = [
        TEXT,
        b"{oops",
        {"prompt": "x", "chosen": "", "rejected": "y"},
        b"{bad",
        TEXT,
        {"prompt": "what", "chosen": "3"},
    ]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    summary = prepare(
        src, tmp_path / "o", tokenizer=TINY, opts=PrepareOptions(skip_invalid=True), quiet=True
    )
    assert summary["rows"] == 6 and summary["kept"] == 2  # a repeated pair is not a tie
    assert summary["dropped"] == {
        "invalid:empty_text": 1,
        "invalid:malformed_json": 2,
        "invalid:missing_field": 1,
    }
    assert PreparedPairs(tmp_path / "o").source_rows() == [0, 4]


def test_setup_errors_are_never_skipped(tmp_path, bpe_dir):
    conv = {"chosen": [USER, ASST], "rejected": [USER, {"role": "assistant", "content": "4"}]}
    src = write_jsonl(tmp_path / "c.jsonl", [conv])
    with pytest.raises(DataError, match="no chat template"):
        prepare(
            src,
            tmp_path / "o",
            tokenizer=bpe_dir,
            opts=PrepareOptions(skip_invalid=True),
            quiet=True,
        )
    with pytest.raises(DataError, match="text rows need --tokenizer"):
        prepare(
            write_jsonl(tmp_path / "t.jsonl", [TEXT]),
            tmp_path / "o2",
            tokenizer=None,
            opts=PrepareOptions(),
            quiet=True,
        )


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        prepare(
            str(tmp_path / "empty.jsonl"),
            tmp_path / "o",
            tokenizer=None,
            opts=PrepareOptions(),
            quiet=True,
        )
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        prepare(
            str(tmp_path / "blank.jsonl"),
            tmp_path / "o",
            tokenizer=None,
            opts=PrepareOptions(),
            quiet=True,
        )
    with pytest.raises(DataError, match="no such file or directory"):
        prepare(
            str(tmp_path / "nope.jsonl"),
            tmp_path / "o",
            tokenizer=None,
            opts=PrepareOptions(),
            quiet=True,
        )


def test_hub_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(DataError, match="Hub is unreachable"):
        prepare(
            "princeton-nlp/llama3-ultrafeedback",
            tmp_path / "o",
            tokenizer=None,
            opts=PrepareOptions(),
            quiet=True,
        )
    assert time.time() - start < 5


def test_json_parquet_and_save_to_disk_sources_agree(tmp_path):
    import datasets

    rows = [long_ids_row(3, 2, 4), long_ids_row(4, 3, 2)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "d"))
    results = []
    for src, split in (
        (tmp_path / "a.json", None),
        (tmp_path / "a.parquet", None),
        (tmp_path / "d", "train"),
    ):
        out = tmp_path / f"o_{src.name}"
        prepare(str(src), out, tokenizer=None, opts=PrepareOptions(), split=split, quiet=True)
        results.append(list(PreparedPairs(out)))
    assert results[0] == results[1] == results[2] and len(results[0]) == 2
    with pytest.raises(DataError, match="no split 'dev'"):
        prepare(
            str(tmp_path / "d"),
            tmp_path / "x",
            tokenizer=None,
            opts=PrepareOptions(),
            split="dev",
            quiet=True,
        )


def test_parallel_workers_give_the_same_result(tmp_path):
    rows = [TEXT, {**TEXT, "rejected": " 4"}] * 40
    src = write_jsonl(tmp_path / "w.jsonl", rows)
    prepare(src, tmp_path / "w1", tokenizer=TINY, opts=PrepareOptions(), quiet=True)
    prepare(src, tmp_path / "w2", tokenizer=TINY, opts=PrepareOptions(), num_workers=2, quiet=True)
    assert list(PreparedPairs(tmp_path / "w1")) == list(PreparedPairs(tmp_path / "w2"))


def test_cache_is_fingerprinted(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [TEXT])
    cache = str(tmp_path / "cache")
    a = load_pairs(src, tokenizer=TINY, opts=PrepareOptions(), cache_dir=cache)
    stamp = (a.path / "prepared.json").stat().st_mtime_ns
    b = load_pairs(src, tokenizer=TINY, opts=PrepareOptions(), cache_dir=cache)
    assert b.path == a.path and (b.path / "prepared.json").stat().st_mtime_ns == stamp
    c = load_pairs(src, tokenizer=TINY, opts=PrepareOptions(max_length=8), cache_dir=cache)
    assert c.path != a.path  # other options, other entry
    write_jsonl(tmp_path / "c.jsonl", [TEXT, {**TEXT, "rejected": " 9"}])
    d = load_pairs(src, tokenizer=TINY, opts=PrepareOptions(), cache_dir=cache)
    assert d.path != a.path and len(d) == 2  # other content, re-prepared
