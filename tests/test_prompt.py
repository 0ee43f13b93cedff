"""Prompt building and reply cleaning, with the real built-in personas."""

from bot.prompt import ELLIPSIS, Turn, build_prompt, clean_reply, shorten
from persona import PersonaLibrary


def words(text: str) -> int:
    return len(text.split())


def haru():
    return PersonaLibrary().get("haru")


def test_transcript_ends_with_persona_label_and_stops_at_newline():
    card = haru()
    prompt = build_prompt(card, [Turn("char", "안녕"), Turn("user", "배고파\n진짜로")], count_tokens=words, budget=10_000)
    assert prompt.text.endswith(f"{card.user_name()}: 배고파 진짜로\n{card.name}:")
    assert prompt.stop == ["\n"]
    assert card.description.splitlines()[0] in prompt.text
    assert prompt.dropped_turns == 0
    assert prompt.messages[-1] == {"role": "user", "content": "배고파\n진짜로"}


def test_oldest_turns_are_dropped_first_and_last_turn_always_kept():
    card = haru()
    history = [Turn("user" if i % 2 else "char", f"말 {i} " * 20) for i in range(40)]
    full = build_prompt(card, history, count_tokens=words, budget=100_000)
    small = build_prompt(card, history, count_tokens=words, budget=full.tokens // 3)
    assert small.tokens <= full.tokens // 3
    assert small.dropped_turns > 0
    assert "말 39" in small.text and "말 0 " not in small.text
    tiny = build_prompt(card, history, count_tokens=words, budget=5)  # nothing fits: still the newest turn
    assert tiny.dropped_turns == 39 and f"{card.user_name()}: 말" in tiny.text


def test_a_newest_turn_over_the_budget_is_cut_to_fit():
    card = haru()
    base = build_prompt(card, [Turn("user", "x")], count_tokens=words, budget=100_000).tokens
    history = [Turn("char", "안녕"), Turn("user", "처음 " + "단어 " * 3000 + "끝")]
    prompt = build_prompt(card, history, count_tokens=words, budget=base + 100)
    assert prompt.shortened_last and prompt.tokens <= base + 100
    assert "처음" in prompt.text and "끝" in prompt.text and ELLIPSIS.strip() in prompt.text


def test_chat_template_gets_system_and_alternating_roles():
    seen = {}

    def template(messages):
        seen["messages"] = messages
        return "rendered"

    history = [Turn("char", "hi"), Turn("user", "a"), Turn("user", "b")]
    prompt = build_prompt(haru(), history, count_tokens=words, budget=10_000, chat_template=template)
    assert prompt.text == "rendered" and prompt.stop == []
    roles = [m["role"] for m in seen["messages"]]
    assert roles == ["system", "assistant", "user"]
    assert seen["messages"][-1]["content"] == "a\nb"


def test_shorten_keeps_head_and_tail():
    text = "가" * 1000 + "나" * 100_000 + "다" * 1000
    short, cut = shorten(text, 2000)
    assert cut and len(short) == 2000
    assert short.startswith("가") and short.endswith("다") and ELLIPSIS in short
    assert shorten("짧아", 2000) == ("짧아", False)


def test_clean_reply_cuts_other_speakers_and_labels():
    card = haru()
    me = card.user_name()
    assert clean_reply(f" {card.name}: 응 좋아! {me}: 그래", card) == "응 좋아!"
    assert clean_reply("  ", card) == ""
    assert clean_reply(f"{me}: 뭐야", card) == "뭐야"


def test_the_shared_prefix_is_the_persona_part_every_chat_starts_with():
    card = haru()
    for template in (None, lambda messages: "".join(f"<{m['role']}>{m['content']}" for m in messages)):
        one = build_prompt(card, [Turn("user", "고구마피자 먹었어")], count_tokens=words, budget=10_000,
                           chat_template=template)
        other = build_prompt(card, [Turn("user", "비 온다"), Turn("char", "우산 챙겨!"), Turn("user", "응")],
                             count_tokens=words, budget=10_000, chat_template=template)
        assert one.prefix == other.prefix and card.description[:10] in one.prefix
        assert one.text.startswith(one.prefix) and "고구마피자" not in one.prefix


def test_a_long_history_is_counted_newest_first_only_as_far_as_the_budget():
    card = haru()
    history = [Turn("user" if i % 2 else "char", f"메시지 번호 {i} 입니다") for i in range(2000)]
    counted = []

    def counting(text: str) -> int:
        counted.append(text)
        return words(text)

    prompt = build_prompt(card, history, count_tokens=counting, budget=400)
    assert 0 < len(history) - prompt.dropped_turns < 200
    assert len(counted) < 300  # not one count per stored turn
    assert "메시지 번호 1999" in prompt.text and "메시지 번호 0 " not in prompt.text
