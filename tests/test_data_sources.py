"""Document sources (every reader kind, splits, errors) and the embedded stdlib corpus."""

import json
import math

import pytest
from pydantic import ValidationError
from source_helpers import load_docs, named

from llama4_jax.data import DataError, corpus
from llama4_jax.data.sources import is_eval_document, iter_documents


def docs_of(**kw):
    return list(iter_documents(named("s", eval_fraction=0.0, **kw).source))


def test_text_folder_is_read_in_sorted_order_without_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("second\n\nthird para")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.md").write_text("line one\nline two\n")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / ".git" / "x").write_text("secret")
    assert docs_of(path=str(tmp_path)) == ["first", "second\n\nthird para", "line one\nline two\n"]
    assert docs_of(path=str(tmp_path), split="paragraph") == [
        "first", "second", "third para", "line one\nline two\n"]
    assert docs_of(path=str(tmp_path), split="line") == [
        "first", "second", "third para", "line one", "line two"]
    assert docs_of(path=str(tmp_path / "*.txt")) == ["first", "second\n\nthird para"]


def test_jsonl_with_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": "alpha", "id": 1}, {"body": None}, {"body": "beta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert docs_of(path=str(path), field="body") == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"d.jsonl:1: record has no field 'text'"):
        docs_of(path=str(path))


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x1", None, "x2"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"content": ["y1"], "n": [4]}), tmp_path / "b.parquet")
    assert docs_of(path=str(tmp_path), kind="parquet", field="content") == ["x1", "x2", "y1"]
    with pytest.raises(DataError, match="no column 'text'"):
        docs_of(path=str(tmp_path / "a.parquet"))


def test_array_record_text_and_json_records(tmp_path):
    from array_record.python import array_record_module

    path = tmp_path / "r.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for record in [b"plain text", json.dumps({"text": "from json"}).encode(),
                   "{not json}".encode(), "ünïcode".encode()]:
        writer.write(record)
    writer.close()
    assert docs_of(path=str(path)) == ["plain text", "from json", "{not json}", "ünïcode"]


def test_kind_is_inferred_from_the_path():
    kinds = {p: named("s", p).source.resolved_kind for p in
             ["a.jsonl", "a.jsonl.gz", "x.parquet", "r.array_record", "builtin:stdlib_code", "dir"]}
    assert kinds == {"a.jsonl": "jsonl", "a.jsonl.gz": "jsonl", "x.parquet": "parquet",
                     "r.array_record": "array_record", "builtin:stdlib_code": "builtin",
                     "dir": "text"}


def test_bad_specs_raise_data_error_naming_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.jsonl"):
        load_docs(named("s", str(tmp_path / "missing.jsonl")))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="'s' .* has no training documents"):
        load_docs(named("s", str(tmp_path / "blank.txt")))
    with pytest.raises(ValidationError, match="split"):
        named("s", "x", split="sentence")
    with pytest.raises(DataError, match="unknown builtin source 'nope'"):
        load_docs(named("s", "builtin:nope"))


def test_eval_split_is_disjoint_deterministic_and_near_the_fraction(tmp_path):
    n, fraction = 3000, 0.1
    (tmp_path / "d.txt").write_text("\n".join(f"document number {i}" for i in range(n)))
    spec = named("s", str(tmp_path / "d.txt"), split="line", eval_fraction=fraction)
    train, held_out = load_docs(spec)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == n
    # 4 binomial standard errors: a correct hash split fails this about once in 16,000 runs.
    assert abs(len(held_out) / n - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / n)
    assert load_docs(spec) == (train, held_out)
    # The split follows content: a duplicate lands on the same side as the original.
    assert is_eval_document(held_out[0], fraction) and not is_eval_document(train[0], fraction)


# ----------------------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def built_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, {name: corpus.load_builtin(name, root) for name in corpus.builtin_source_names()}


def test_corpus_builds_with_expected_content_and_budgets(built_corpus):
    _, docs = built_corpus
    assert set(docs) == {"stdlib_prose", "stdlib_code", "stdlib_rare"}
    budgets = {"stdlib_prose": corpus.PROSE_BUDGET, "stdlib_code": corpus.CODE_BUDGET,
               "stdlib_rare": corpus.RARE_FILES_BUDGET + corpus.RARE_CODECS_BUDGET
               + corpus.RARE_UNICODE_BUDGET}
    for name, documents in docs.items():
        size = sum(len(d.encode()) for d in documents)
        assert 200_000 < size <= budgets[name], name
        assert all(d.strip() for d in documents)
    assert any(d.startswith("# json\n") for d in docs["stdlib_prose"])
    assert sum("\ndef " in d for d in docs["stdlib_code"]) > 100
    rare = docs["stdlib_rare"]
    assert any(d.startswith("codec cp437:") for d in rare)
    assert any("U+00C0\tÀ\tLATIN CAPITAL LETTER A WITH GRAVE" in d for d in rare)
    assert not any("site-packages" in d[:200] for d in rare)


def test_corpus_build_is_deterministic(built_corpus, tmp_path):
    _, first = built_corpus
    second = {name: corpus.load_builtin(name, tmp_path) for name in corpus.builtin_source_names()}
    assert second == first


def test_corpus_cache_is_reused_and_invalidated_by_version(built_corpus, monkeypatch):
    root, first = built_corpus

    def must_not_build():
        raise AssertionError("cache was not used")

    monkeypatch.setitem(corpus._BUILDERS, "stdlib_code", must_not_build)
    assert corpus.load_builtin("stdlib_code", root) == first["stdlib_code"]
    assert list(corpus.corpus_cache_dir(root).glob("*.tmp")) == []  # atomic writes left no debris

    path = corpus.corpus_cache_dir(root) / "stdlib_code.json"
    stale = json.loads(path.read_text())
    stale["corpus_version"] = -1
    path.write_text(json.dumps(stale))
    monkeypatch.setitem(corpus._BUILDERS, "stdlib_code", lambda: ["rebuilt"])
    assert corpus.load_builtin("stdlib_code", root) == ["rebuilt"]


def test_builtin_source_reads_through_the_env_cache(built_corpus, monkeypatch):
    root, first = built_corpus
    monkeypatch.setenv("LLAMA4_JAX_CACHE", str(root))
    train, held_out = load_docs(named("p", "builtin:stdlib_prose", eval_fraction=0.05))
    assert sorted(train + held_out) == sorted(first["stdlib_prose"])
    assert held_out
