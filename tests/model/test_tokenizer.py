from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # ünïcode ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eos_id]) == text


def test_model_directory_tokenizer_json_is_used(tmp_path):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "hello there"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path, vocab_size=1000)
    assert isinstance(loaded, HFTokenizer)
    ids = loaded.encode("hello world")
    assert len(ids) == 2 and loaded.decode(ids) == "hello world"


def test_byte_vocabulary_without_tokenizer_json_gets_bytes_and_others_none(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=260), ByteTokenizer)
    assert load_tokenizer(tmp_path, vocab_size=100) is None
    assert load_tokenizer(None, vocab_size=None) is None
