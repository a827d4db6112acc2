import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hgdpo.errors import HgdpoError
from hgdpo.models.tokenizer import clip_tokenizer
from hgdpo.prompts import derived_id, digest, overlong, read_prompts


def test_txt_skips_blank_lines_and_derives_stable_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  a blue   square \n")
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["a red circle", "a blue square"]
    assert [p.index for p in prompts] == [0, 1]
    assert prompts[0].id == derived_id("a red circle", 0) and prompts[1].id == derived_id("a blue square", 1)
    assert read_prompts(path) == prompts  # stable across reads
    # the same text at another position is another prompt
    assert derived_id("a red circle", 0) != derived_id("a red circle", 1)


def test_jsonl_csv_parquet_with_user_ids(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"id": "x1", "prompt": "one"}) + "\n" + json.dumps({"id": 7, "prompt": "two"}) + "\n")
    assert [(p.id, p.text) for p in read_prompts(jsonl)] == [("x1", "one"), ("7", "two")]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt_id,caption\na,"first, with comma"\nb,second\n')
    assert [(p.id, p.text) for p in read_prompts(csv_path)] == [("a", "first, with comma"), ("b", "second")]
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["u", "v"], "key": ["k1", "k2"]}), parquet)
    assert [(p.id, p.text) for p in read_prompts(parquet, id_column="key")] == [("k1", "u"), ("k2", "v")]


def test_parti_prompts_people_category(parti_prompts):
    people = read_prompts(parti_prompts, category="People")
    assert len(people) == 177  # the paper's evaluation set
    assert len(read_prompts(parti_prompts, category="People", max_prompts=10)) == 10
    assert len({p.id for p in people}) == 177
    with pytest.raises(HgdpoError, match="no prompt has category 'Peoples'"):
        read_prompts(parti_prompts, category="Peoples")


@pytest.mark.parametrize("content, message", [
    (b"", r"p\.txt: no prompts \(the file is empty"),
    (b"\n   \n\t\n", r"p\.txt: no prompts \(the file is empty or holds only blank lines"),
    (b"a good prompt\ncaf\xe9 au lait\n", r"p\.txt:2: not UTF-8"),
])
def test_bad_txt_files(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    with pytest.raises(HgdpoError, match=message):
        read_prompts(path)


def test_bad_structured_files(tmp_path):
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n')
    with pytest.raises(HgdpoError, match=r"d\.jsonl:3: duplicate prompt id 'a' \(first at line 1\)"):
        read_prompts(dup)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(HgdpoError, match=r"b\.jsonl:2: not valid JSON"):
        read_prompts(broken)
    nocol = tmp_path / "n.csv"
    nocol.write_text("title,author\na,b\n")
    with pytest.raises(HgdpoError, match=r"n\.csv: no prompt column"):
        read_prompts(nocol)
    empty_cell = tmp_path / "e.csv"
    empty_cell.write_text("prompt,id\nfine,1\n,2\n")
    with pytest.raises(HgdpoError, match=r"e\.csv:3: empty prompt"):
        read_prompts(empty_cell)
    with pytest.raises(HgdpoError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    odd = tmp_path / "p.docx"
    odd.write_text("x")
    with pytest.raises(HgdpoError, match="cannot tell the format"):
        read_prompts(odd)


def test_overlong_prompts_are_found_and_digest_changes(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("short prompt\n" + " ".join(["word"] * 80) + "\n")
    prompts = read_prompts(path)
    long = overlong(prompts, clip_tokenizer())
    assert [(p.index, n) for p, n in long] == [(1, 82)]
    assert digest(prompts) != digest(prompts[:1])
