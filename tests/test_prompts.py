"""Prompt-list reader on slices of the real published lists and the other circulating formats."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from memaudit.common import UserError
from memaudit.data.prompts import read_prompts

DATA = Path(__file__).parent / "data" / "prompts"


def test_memorized_laion_semicolon_csv_with_labels():
    recs = read_prompts(DATA / "memorized_laion_prompts_head20.csv")
    assert len(recs) == 20
    assert recs[0].text == "The No Limits Business Woman Podcast"
    assert recs[0].label == "VM"
    assert recs[1].label == "TM"
    assert recs[1].text.startswith("Full body U-Zip main opening")
    # one level of CSV quoting is undone (the published file holds the caption double-quoted)
    assert recs[3].text == '"Watch: Passion Pit\'s New Video, ""Lifted Up (1985)"""'
    assert recs[5].text == "Sony Won't Release <i>The Interview</i> on VOD"
    assert recs[0].extra["Index"] == "1030727993"
    assert recs[0].extra["URL"].startswith("https://onlinecoach1.hipcast.com/")
    assert recs[0].extra["row"] == "0"  # the leading unnamed index column
    assert [r.index for r in recs] == list(range(20))
    assert {r.label for r in recs} == {"VM", "TM"}
    # the same counts as the stdlib reader on the same file
    with open(DATA / "memorized_laion_prompts_head20.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    assert [r.text for r in recs] == [row["Caption"].strip() for row in rows]
    assert [r.label for r in recs] == [row["type"] for row in rows]


def test_unmemorized_laion_csv_has_no_label():
    recs = read_prompts(DATA / "unmemorized_laion_prompts_head20.csv")
    assert len(recs) == 20
    assert all(r.label is None for r in recs)
    assert recs[1].text == "Soaring by Peter Eades"
    assert recs[1].extra["Index"] == "7984"
    assert recs[0].source.endswith("unmemorized_laion_prompts_head20.csv")


def test_plain_text_skips_blank_and_comment_lines():
    recs = read_prompts(DATA / "plain.txt")
    assert [r.text for r in recs] == [
        "The No Limits Business Woman Podcast",
        "Mothers influence on her young hippo",
        "Talks on the Precepts and Buddhist Ethics",
    ]
    assert [r.index for r in recs] == [0, 1, 2]
    assert all(r.label is None and r.extra == {} for r in recs)


def test_jsonl_keeps_index_and_url():
    recs = read_prompts(DATA / "wen_sample.jsonl")
    assert len(recs) == 3
    assert recs[2].text == "Sony Won't Release <i>The Interview</i> on VOD"
    assert recs[0].extra == {
        "index": 1030727993,
        "url": "https://onlinecoach1.hipcast.com/albumart/1000_1618923228.jpg",
    }


def test_membench_comma_csv_with_list_literal():
    recs = read_prompts(DATA / "membench_sample.csv")
    assert [r.text for r in recs] == [
        "The No Limits Business Woman Podcast",
        "Mothers influence on her young hippo, at dusk",
        "Talks on the Precepts and Buddhist Ethics",
    ]
    assert recs[0].extra["urls"] == [
        "https://onlinecoach1.hipcast.com/albumart/1000_1618923228.jpg",
        "https://example.org/b.jpg",
    ]
    assert recs[2].extra["urls"] == []


def test_prompt_column_case_insensitive_and_label_column(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("id,TEXT,Label\n1,a red car,generic\n2,a blue boat,\n", encoding="utf-8")
    recs = read_prompts(p)
    assert [(r.text, r.label) for r in recs] == [("a red car", "generic"), ("a blue boat", None)]


def test_unknown_suffix_is_sniffed(tmp_path):
    p = tmp_path / "list.dat"
    shutil.copy(DATA / "wen_sample.jsonl", p)
    assert len(read_prompts(p)) == 3
    q = tmp_path / "list2.dat"
    q.write_text(";Caption;type\n0;hello;VM\n", encoding="utf-8")
    assert read_prompts(q)[0].label == "VM"


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.csv")
    p = tmp_path / "bad.csv"
    p.write_text("a;b\n1;2\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompt column"):
        read_prompts(p)
    q = tmp_path / "bad.bin"
    q.write_text("just some words\nmore words\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown prompt-list format"):
        read_prompts(q)
    r = tmp_path / "bad.jsonl"
    r.write_text('{"url": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no prompt key"):
        read_prompts(r)
    e = tmp_path / "empty.txt"
    e.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(e)


def test_target_key_column_names_the_training_item_a_prompt_reproduces(tmp_path):
    """issue 17: a `target_key` column (the canary's prompts.csv) is read as the prompt's
    target; blank or absent means none."""
    f = tmp_path / "p.csv"
    f.write_text("prompt,label,target_key\na,64x,planted-64x-00-00\nb,generic,\n")
    recs = read_prompts(f)
    assert [r.target_key for r in recs] == ["planted-64x-00-00", None]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a", "target_key": " k-1 "}\n{"prompt": "b", "key": 3}\n'
                 '{"prompt": "c", "target_key": [1]}\n')
    assert [r.target_key for r in read_prompts(j)] == ["k-1", "3", None]
