"""Tokenizers: lossless round trips, special ids, and clear errors for missing files."""

import pytest

from llama4_jax.data import ByteTokenizer, DataError, Tokenizer, make_tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a packed row holds several documents separated by eos",
    "mixture weights change at every curriculum stage",
    "the model learns what the data shows it",
] * 20


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    (folder / "train.txt").write_text("\n".join(SENTENCES))
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "sp"), vocab_size=60,
        model_type="bpe", character_coverage=1.0, pad_id=3, minloglevel=2)
    return folder / "sp.model"


def test_byte_tokenizer_is_lossless_and_specials_are_outside_bytes():
    tok = make_tokenizer("byte")
    text = "héllo wörld — 数据 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    assert tok.vocab_size == 259 and specials == {256, 257, 258}
    # Specials carry no text.
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert isinstance(tok, Tokenizer)


def test_hf_tokenizer_round_trip(hf_path):
    tok = make_tokenizer("hf", str(hf_path))
    text = "the lazy fox packs several rows"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges were learned, so it is not bytewise
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "dog"]) == [ids, tok.encode("dog")]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert max(ids) < tok.vocab_size
    assert tok.fingerprint == make_tokenizer("hf", str(hf_path)).fingerprint


def test_hf_tokenizer_without_eos_needs_an_explicit_token(tmp_path):
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=280, special_tokens=["<end>"]))
    path = tmp_path / "noeos.json"
    tok.save(str(path))
    with pytest.raises(DataError, match="noeos.json"):
        make_tokenizer("hf", str(path))
    assert make_tokenizer("hf", str(path), eos_token="<end>").eos_id == tok.token_to_id("<end>")


def test_sentencepiece_round_trip(sp_path):
    tok = make_tokenizer("sentencepiece", str(sp_path))
    text = "the quick fox learns the data"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 60 and max(ids) < 60
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.encode_batch([text]) == [ids]


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_missing_tokenizer_file_names_the_file(kind, tmp_path):
    missing = tmp_path / "nowhere" / "tok.bin"
    with pytest.raises(DataError, match="nowhere/tok.bin"):
        make_tokenizer(kind, str(missing))


def test_unknown_kind_is_rejected():
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        make_tokenizer("wordpiece")
    assert isinstance(make_tokenizer(), ByteTokenizer)
