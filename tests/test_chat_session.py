"""Chat keeps its KV cache across turns and survives save / load."""

from __future__ import annotations

import re

import pytest

from edge_adapt.engine import GREEDY, Engine, Finished, SampleStarted, SamplingParams
from edge_adapt.errors import BudgetError, UsageError
from edge_adapt.session import ChatSession, Notice


def _reply(session: ChatSession, text: str) -> str:
    return next(e.text for e in session.send(text) if isinstance(e, Finished))


def test_second_turn_decodes_only_the_new_tokens(engine: Engine):
    chat = ChatSession(engine, params=GREEDY, max_tokens=24)
    try:
        _reply(chat, "Name a big city.")
        first = chat.last
        _reply(chat, "And a river?")
        second = chat.last
        assert first is not None and second is not None
        assert first.decoded_tokens == first.prompt_tokens
        assert second.prompt_tokens > first.prompt_tokens
        # Only the new user turn (plus the re-tokenized tail of the previous reply at most) is decoded.
        new = second.prompt_tokens - first.prompt_tokens
        assert second.decoded_tokens <= new, (second, first)
        # The reply's own tokens were already in the cache: what is decoded is the new turn's markup and text.
        reply_tokens = second.prompt_tokens - first.prompt_tokens - second.decoded_tokens
        assert reply_tokens >= 10, (second, first)
        assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    finally:
        chat.close()


def _saved_chat(engine: Engine, path) -> str:
    """A one-turn chat saved to `path`; the reply its second turn, "Now say goodbye.", gets."""
    chat = ChatSession(engine, params=GREEDY, max_tokens=16)
    try:
        _reply(chat, "Say hello.")
        chat.save(path)
        return _reply(chat, "Now say goodbye.")
    finally:
        chat.close()


def test_saved_chat_restores_and_continues_identically(engine: Engine, tmp_path):
    expected = _saved_chat(engine, tmp_path / "c.snap")
    again = ChatSession(engine, params=GREEDY, max_tokens=16)
    try:
        again.load(tmp_path / "c.snap")
        before = engine.decoded_tokens
        got = _reply(again, "Now say goodbye.")
        assert got == expected
        assert again.last is not None and again.last.decoded_tokens < again.last.prompt_tokens
        assert engine.decoded_tokens - before < again.last.prompt_tokens + 16
    finally:
        again.close()


def test_overflowing_conversation_drops_oldest_turns_and_says_so(engine: Engine):
    chat = ChatSession(engine, params=GREEDY, max_tokens=48)
    notices = []
    try:
        for i in range(5):
            for ev in chat.send(f"Tell me fact number {i} about the sea, in one sentence."):
                if isinstance(ev, Notice):
                    notices.append(ev.text)
        assert notices and "dropped" in notices[0]
        assert chat.last is not None and chat.last.prompt_tokens + 48 <= engine.n_ctx_seq
    finally:
        chat.close()


def test_switching_strategy_mid_chat_grows_the_engine_and_keeps_the_conversation():
    import pytest

    from edge_adapt.errors import BudgetError
    from edge_adapt.strategies import Chosen, StrategyConfig

    with Engine(parallel=1, ctx=1024, device="cpu") as e:
        chat = ChatSession(e, params=GREEDY, max_tokens=16, mem_budget=10 * 2**30)
        _reply(chat, "Name a big city.")
        held = list(chat.seq.tokens)
        chat.set_strategy(StrategyConfig(strategy="adaptive", budget=4))  # rounds 1, 1, 2: two samples at once
        assert e.options.parallel == 3 and chat.seq.tokens == held and len(chat.messages) == 2
        events = list(chat.send("And a river?"))
        assert any(isinstance(ev, Chosen) for ev in events) and len(chat.messages) == 4
        assert chat.last.decoded_tokens < chat.last.prompt_tokens - len(held) + 8  # the conversation's KV was kept
        assert e.free_sequences == 2  # the samples went back; the conversation's sequence stays
        chat.mem_budget = 1  # no room to grow: refused at once, and the chat is as it was
        with pytest.raises(BudgetError, match="needs 9 sequences"):
            chat.set_strategy(StrategyConfig(strategy="best-of-n", budget=8))
        assert chat.strategy.strategy == "adaptive" and e.options.parallel == 3
        chat.set_strategy(None)
        assert next(ev for ev in chat.send("One more?") if isinstance(ev, Finished)).text
        chat.close()


def test_slash_commands_missing_their_argument_say_what_they_need(engine: Engine):
    chat = ChatSession(engine, params=GREEDY, max_tokens=8)
    for line, message in (("/save", "/save FILE: name the file to save"), ("/load  ", "/load FILE: name the file to load"),
                          ("/strategy best-of-n -3", "the budget is a whole number >= 1, got '-3'")):
        with pytest.raises(UsageError, match=re.escape(message)):
            chat.command(line)
    for line, message in (("/sve x", "unknown command '/sve'; /help lists them"),
                          ("/reset all", "/reset takes no argument, got 'all'"),
                          ("/strategy single 5", "/strategy single draws one sample: it takes no budget")):
        with pytest.raises(UsageError, match=re.escape(message)):
            chat.command(line)
    with pytest.raises(UsageError, match=re.escape("the budget is a whole number >= 1, got '\u00b2'")):
        chat.command("/strategy best-of-n \u00b2")  # a digit to str.isdigit(), not to int()


def test_save_and_load_take_the_whole_name_and_only_force(engine: Engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat = ChatSession(engine, params=GREEDY, max_tokens=8)
    try:
        _reply(chat, "Say hi.")
        assert chat.command("/save my chat.snap") == "(saved to my chat.snap)"  # was a file named "my"
        assert chat.command('/save --force "my chat.snap"') == "(saved to my chat.snap)"
        for line, message in (("/save x.snap --forc", "/save: unknown option --forc (--force is the only one)"),
                              ("/save --force", "/save FILE: name the file to save"),
                              ("/load my chat.snap --force", "/load: unknown option --force (it takes none)")):
            with pytest.raises(UsageError, match=re.escape(message)):
                chat.command(line)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["my chat.snap"]
        assert chat.command("/load my chat.snap") == "(restored 2 messages)"
    finally:
        chat.close()


def test_a_chat_whose_reply_cannot_fit_its_context_is_refused_at_start(engine: Engine):
    """Not at every message: a reply of max_tokens after the system message and the template's markup."""
    room = engine.n_ctx_seq
    with pytest.raises(BudgetError, match=f"does not fit this chat's context of {room}"):
        ChatSession(engine, max_tokens=room)
    with pytest.raises(BudgetError, match=f"does not fit this chat's context of {room}"):
        ChatSession(engine, system="Be brief. " * room, max_tokens=8)
    floor = len(engine.chat_tokens([{"role": "user", "content": ""}]))  # the default system prompt and markup
    ChatSession(engine, max_tokens=room - floor).close()  # fits, just
    with pytest.raises(BudgetError, match=f"more than this chat's context of {room}"):  # + the suffix does not
        ChatSession(engine, max_tokens=room - floor, strategy={"strategy": "best-of-n", "budget": 2})


def test_a_cancel_while_a_strategy_grows_the_engine_keeps_the_conversation():
    """The engine grows by decoding the conversation again in a new context; a cancel landing there left the
    chat's sequence empty, and the next turn answered with no history and no system message."""
    from edge_adapt.engine.events import Cancelled

    with Engine(parallel=1, ctx=512, device="cpu") as engine:
        chat = ChatSession(engine, system="You are a geographer.", params=GREEDY, max_tokens=8)
        try:
            _reply(chat, "Name a big city.")
            with engine.busy():
                engine.cancel()  # the stop button, while set_strategy re-decodes the conversation
                with pytest.raises(Cancelled):
                    chat.set_strategy({"strategy": "best-of-n", "budget": 2})
            _reply(chat, "And a river?")
            assert chat.last is not None and chat.seq is not None
            in_kv = engine.detokenize(chat.seq.tokens[: chat.last.prompt_tokens])
            assert "geographer" in in_kv and "Name a big city." in in_kv and "And a river?" in in_kv
            assert chat.last.prompt_tokens == len(engine.chat_tokens(chat.messages[:-1]))
        finally:
            chat.close()


def test_a_cancel_before_the_first_token_stops_the_reply(engine: Engine):
    """A stop button pressed between the prompt's decode and the first token (the reply's sample started, no
    token yet) was lost: the engine was idle between the turn's calls, and the whole reply came."""
    chat = ChatSession(engine, params=GREEDY, max_tokens=64)
    try:
        finished = []
        for ev in chat.send("Write a long story about a dragon."):
            if isinstance(ev, SampleStarted):
                engine.cancel()
            elif isinstance(ev, Finished):
                finished.append(ev)
        assert [(f.reason, f.text) for f in finished] == [("cancelled", "")]
        assert chat.messages == []  # no empty assistant turn in the history: the exchange is left out
        # The cancel was for that reply only.
        assert next(e for e in chat.send("Say hi.") if isinstance(e, Finished)).reason in ("eos", "length")
        assert [m["content"] for m in chat.messages][:1] == ["Say hi."]
    finally:
        chat.close()


def test_one_reply_at_a_time_and_an_abandoned_reply_leaves_the_chat_usable(engine: Engine):
    with pytest.raises(UsageError, match="max_tokens must be a whole number >= 1"):
        ChatSession(engine, max_tokens=0)
    chat = ChatSession(engine, params=GREEDY, max_tokens=16)
    try:
        first = chat.send("Name a big city.")
        next(first), next(first)  # the reply is streaming: its sample decodes into the chat's sequence
        for act, what in ((lambda: next(chat.send("And a river?")), "send another message"),
                          (chat.reset, "reset the chat"), (lambda: chat.save("x.snap"), "save the chat"),
                          (chat.close, "close the chat")):
            with pytest.raises(UsageError, match=f"cannot {what} while a reply is streaming"):
                act()
        first.close()  # abandoned: the reply is not recorded, the next turn goes on from the KV it left
        assert chat.messages == []
        reply = _reply(chat, "And a river?")
        # Abandoned after a finished turn: the next turn's KV holds the history, not the abandoned turn.
        third = chat.send("Write a poem about the sea.")
        for _ in range(4):
            next(third)
        third.close()
        _reply(chat, "And a mountain?")
        assert chat.last is not None and chat.seq is not None
        in_kv = engine.detokenize(chat.seq.tokens[: chat.last.prompt_tokens])
        assert "poem" not in in_kv and "And a river?" in in_kv and len(chat.messages) == 4
        fresh = ChatSession(engine, params=GREEDY, max_tokens=16)
        try:
            assert _reply(fresh, "And a river?") == reply  # as if the abandoned turn had never been
        finally:
            fresh.close()
    finally:
        chat.close()
    assert engine.live_sequences == 0


def test_a_chat_saved_by_an_engine_of_another_parallel_loads_and_continues_identically(engine: Engine, tmp_path):
    expected = _saved_chat(engine, tmp_path / "c.snap")
    assert engine.options.parallel != 3
    # llama.cpp's sequence state is tied to its context's KV streams (one per sequence): the tokens are decoded again.
    with Engine(parallel=3, ctx=engine.options.ctx) as other:
        again = ChatSession(other, params=GREEDY, max_tokens=16)
        again.load(tmp_path / "c.snap")
        assert again.seq is not None and other.decoded_tokens == again.seq.n_past
        assert _reply(again, "Now say goodbye.") == expected
        again.close()


def test_a_chat_reply_reads_with_collect_in_every_mode(engine: Engine):
    from edge_adapt import StrategyConfig, collect

    chat = ChatSession(engine, params=GREEDY, max_tokens=8)
    try:
        first = collect(chat.send("Name a colour."))
        second = collect(chat.send("And another?"))
        assert first.text == chat.messages[1]["content"] and second.text == chat.messages[3]["content"]
        # The second turn decoded only what was new: the rest of its prompt came from the KV cache.
        assert second.usage.prompt_tokens_reused == second.usage.prompt_tokens - chat.last.decoded_tokens > 0
        assert second.usage.generated_tokens == second.samples[0].tokens and second.usage.samples_started == 1
        chat.set_strategy(StrategyConfig(strategy="best-of-n", budget=2))
        calls = engine.decode_calls
        third = collect(chat.send("And a third?"))
        assert third.text == chat.messages[5]["content"]
        # A strategy's turn is accounted as a plain one: its prompt's reuse and decode included (was: 0 reused,
        # and the calls that decoded the new message left out).
        assert third.usage.prompt_tokens_reused == third.usage.prompt_tokens - chat.last.decoded_tokens > 0
        assert third.usage.decode_calls == engine.decode_calls - calls
    finally:
        chat.close()


def test_chat_settings_of_the_wrong_type_are_named_and_a_strategy_may_be_a_dict(engine: Engine):
    for kwargs, message in ((dict(max_tokens=8.5), "max_tokens must be a whole number"),
                            (dict(params=None), "params must be a SamplingParams"),
                            (dict(strategy="vote"), "strategy must be a StrategyConfig or a dict")):
        with pytest.raises(UsageError, match=message):
            ChatSession(engine, **kwargs)
    chat = ChatSession(engine, strategy={"strategy": "vote", "budget": 2}, mem_budget="1GB", max_tokens=8)
    assert chat.strategy is not None and chat.strategy.strategy == "vote" and chat.mem_budget == 1 << 30
    with pytest.raises(UsageError, match="not valid Unicode"):
        list(chat.send("caf\udce9"))
    assert chat.messages == [] and engine.live_sequences == 0


def test_a_strategy_option_the_strategy_does_not_read_is_refused(engine: Engine):
    """Was: accepted and ignored in silence (keep beside best-of-n), where `edge-adapt chat` refuses --keep. A
    /strategy switch keeps the settings of the strategy it leaves, for the next switch."""
    from edge_adapt.strategies import StrategyConfig

    with pytest.raises(UsageError, match="^budget is not used by strategy single$"):
        ChatSession(engine, strategy={"strategy": "single", "budget": 4}, max_tokens=8)
    chat = ChatSession(engine, max_tokens=8)
    try:
        with pytest.raises(UsageError, match="^keep is not used by strategy best-of-n$"):
            chat.set_strategy({"strategy": "best-of-n", "budget": 2, "keep": 1})
        with pytest.raises(UsageError, match="^temperature is not used by strategy adaptive$"):
            chat.set_strategy(StrategyConfig(strategy="adaptive", budget=2, temperature=1.5))
        assert chat.strategy is None  # left as it was
        chat.set_strategy({"strategy": "prune", "budget": 2, "keep": 1, "prune_at": [4]})
        assert chat.command("/strategy best-of-n").startswith("(strategy best-of-n, budget 2;")
        assert _reply(chat, "Hi.")  # answered with the kept keep unread
        chat.command("/strategy prune")
        assert chat.strategy is not None and (chat.strategy.k, chat.strategy.prune_at) == (1, (4,))
    finally:
        chat.close()


def test_a_snapshot_needs_a_file_name(engine: Engine, tmp_path):
    chat = ChatSession(engine, params=GREEDY, max_tokens=4)
    try:
        _reply(chat, "Hi.")
        for bad in (None, b"c.snap", ""):  # "" would be '.', the current directory
            for act in (lambda: chat.save(bad), lambda: chat.load(bad)):
                with pytest.raises(UsageError, match="a snapshot is a file: give its name"):
                    act()
    finally:
        chat.close()


def test_a_reset_chat_answers_as_a_new_one_would(engine: Engine):
    """reset() kept the turn counter that seeds each reply: a 'new chat' built on it did not reproduce one."""
    params = SamplingParams(temperature=1.0, seed=1)
    chat = ChatSession(engine, params=params, max_tokens=12)
    try:
        _reply(chat, "Hello")
        chat.reset()
        after_reset = _reply(chat, "Hello")
    finally:
        chat.close()
    fresh = ChatSession(engine, params=params, max_tokens=12)
    try:
        assert after_reset == _reply(fresh, "Hello")
    finally:
        fresh.close()


def test_the_strategy_command_gives_single_no_budget_and_counts_sequences_right(engine: Engine):
    chat = ChatSession(engine, params=GREEDY, max_tokens=8)
    assert chat.command("/strategy best-of-n 2") == "(strategy best-of-n, budget 2; the engine holds 9 sequences)"
    assert chat.command("/strategy single") == "(strategy single; the engine holds 9 sequences)"
    with Engine(parallel=1, ctx=256, device="cpu") as e:
        assert ChatSession(e, params=GREEDY, max_tokens=8).command("/strategy") == \
            "(strategy single; the engine holds 1 sequence)"


def test_save_and_load_expand_a_leading_tilde_and_each_front_end_names_its_own_force(engine: Engine, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = tmp_path / "c.snap"
    chat = ChatSession(engine, params=GREEDY, max_tokens=4)
    try:
        _reply(chat, "Say hi.")
        assert chat.command("/save ~/c.snap") == f"(saved to {saved})"  # was "output directory ~ does not exist"
        assert chat.command("/load ~/c.snap") == "(restored 2 messages)"
        with pytest.raises(UsageError, match=re.escape(f"{saved} already exists; /save {saved} --force overwrites it")):
            chat.command("/save ~/c.snap")
        with pytest.raises(UsageError, match=re.escape(f"{saved} already exists; save(..., force=True) overwrites it")):
            chat.save(saved)  # the API has no --force flag
        chat.save(saved, force=True)
    finally:
        chat.close()


def test_a_strategy_one_context_cannot_hold_is_refused_with_its_largest_budget(engine: Engine):
    chat = ChatSession(engine, params=GREEDY, max_tokens=8)
    with pytest.raises(UsageError, match="its largest budget is 254"):  # was: "or unify the KV"
        chat.set_strategy({"strategy": "best-of-n", "budget": 255})
    assert chat.strategy is None


def test_a_strategy_past_the_memory_budget_names_the_chats_own_fixes(engine: Engine):
    """The refusal said `lower -n or --ctx`: a chat has no -n."""
    from edge_adapt.engine.budget import plan

    sized = [plan(engine.info, parallel=n, ctx=engine.options.ctx).total for n in (engine.options.parallel, 17)]
    chat = ChatSession(engine, params=GREEDY, max_tokens=8, mem_budget=sum(sized) // 2)
    with pytest.raises(BudgetError, match=re.escape("(lower the strategy's budget, or start the chat with a smaller "
                                                    "--ctx)")):
        chat.set_strategy({"strategy": "best-of-n", "budget": 16})
