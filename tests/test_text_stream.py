from edge_adapt.engine.text import TextStream


def _feed(stream: TextStream, chunks: list[bytes]) -> tuple[list[str], bool]:
    out, stopped = [], False
    for c in chunks:
        text, stopped = stream.push(c)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_multibyte_character_is_never_split():
    data = "naïve café 😀".encode()
    chunks = [data[i : i + 1] for i in range(len(data))]  # one byte per "token"
    stream = TextStream()
    out, _ = _feed(stream, chunks)
    for piece in out:
        piece.encode("utf-8")  # a split character would have produced U+FFFD or a lone surrogate
        assert "\ufffd" not in piece
    assert "".join(out) + stream.flush() == "naïve café 😀"


def test_stop_string_across_token_boundaries_is_cut_and_not_shown():
    stream = TextStream(stop=("\nUser:",))
    out, stopped = _feed(stream, [b"The answer", b" is 4.\n", b"Us", b"er:", b" more"])
    assert stopped
    assert "".join(out) == "The answer is 4."
    assert stream.text == "The answer is 4."


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_stop():
    stream = TextStream(stop=("###",))
    out, stopped = _feed(stream, [b"a #", b"# b"])
    assert not stopped
    assert "".join(out) + stream.flush() == "a ## b"
    assert out[0] == "a "  # "#" held back while it could begin "###"


def test_incomplete_character_at_end_becomes_replacement_char():
    stream = TextStream()
    stream.push("é".encode()[:1])
    assert stream.flush() == "\ufffd"


def test_tokens_within_counts_the_tokens_that_hold_shown_text():
    from edge_adapt.engine.text import tokens_within

    pieces = [b"The answer", b" is 4.\n", b"Us", b"er:", b" more"]
    stream = TextStream(stop=("\nUser:",))
    _feed(stream, pieces)
    assert tokens_within(pieces, stream.text) == 2  # " is 4.\n" holds the end of the reply, and "\n" of the stop
    stream = TextStream(stop=("Us",))
    _feed(stream, pieces)
    assert tokens_within(pieces, stream.text) == 2  # the stop string begins at a token's start: that token goes
    assert tokens_within([b"\xc3", b"\xa9t\xc3", b"\xa9"], "\u00e9t") == 2
    assert tokens_within([b"x"], "") == 0
