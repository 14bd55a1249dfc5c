from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalText


def stream(tokenizer, text, stop=()):
    ids = tokenizer(text)["input_ids"]
    inc = IncrementalText(tokenizer, [], stop)
    pieces = [inc.add(t) for t in ids]
    pieces.append(inc.finish())
    return pieces, inc


def test_multibyte_characters_are_never_split(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = "Café über 東京 🙂🚀 done"
    pieces, inc = stream(tok, text)
    assert "".join(pieces) == text == inc.text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stops_before_the_stop_string_and_never_shows_it(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    pieces, inc = stream(tok, "SELECT name FROM products WHERE price", stop=("FROM",))
    assert inc.stopped
    assert "".join(pieces) == "SELECT name " == inc.text
    assert all("F" not in p for p in pieces)


def test_held_back_text_is_released_when_it_is_not_a_stop(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    pieces, inc = stream(tok, "the fox and the dog", stop=("the end",))
    assert not inc.stopped
    assert "".join(pieces) == "the fox and the dog"
