"""The bot's own words (help, errors, confirmations) in Korean and English.

    render("pick_out_of_range", "ko", count=3)

Every key exists in both languages; a test checks that they also take the same parameters.
"""

from __future__ import annotations

LANGUAGES = ("ko", "en")

MESSAGES: dict[str, dict[str, str]] = {
    "help": {
        "ko": "답장 후보가 번호와 함께 나와. 마음에 드는 번호를 골라 주면 그 답장으로 대화가 이어지고, "
              "네가 고른 답장으로 나는 매일 밤 조금씩 배워.\n"
              "  숫자        후보 고르기\n"
              "  /다시       후보 다시 뽑기 (/regen)\n"
              "  /새로       새 대화 시작 (/reset)\n"
              "  /페르소나   페르소나 목록 보기, /페르소나 이름 으로 바꾸기 (/persona)\n"
              "  /학습       내 선택으로 배우기 켜기/끄기 (/learning on|off)\n"
              "  /export     내 데이터 JSON 파일로 저장하기\n"
              "  /forget     내 데이터 모두 지우기\n"
              "  /도움       이 도움말 (/help)\n"
              "  /끝         끝내기 (/quit)",
        "en": "Reply candidates come with numbers. Pick the one you like and the conversation goes on with it; "
              "every night I learn a little from your picks.\n"
              "  number      pick a candidate\n"
              "  /regen      sample new candidates\n"
              "  /reset      start a new conversation\n"
              "  /persona    list personas, /persona NAME to switch\n"
              "  /learning   learn from my picks: /learning on|off\n"
              "  /export     save your data to a JSON file\n"
              "  /forget     delete all your data\n"
              "  /help       this help\n"
              "  /quit       leave",
    },
    "help_chat": {
        "ko": "말을 걸면 답장 후보가 번호와 함께 나와. 마음에 드는 걸 고르면 그 답장으로 대화가 이어지고, "
              "네가 고른 답장으로 나는 매일 밤 조금씩 배워.\n"
              "  1️⃣ 2️⃣ 3️⃣   후보 고르기\n"
              "  🔄          후보 다시 뽑기\n"
              "  👍 👎       고른 답장 평가하기\n"
              "  /start      인사하기\n"
              "  /persona    페르소나 목록, 이름을 붙이면 바꾸기\n"
              "  /reset      새 대화 시작 (지난 대화는 저장돼)\n"
              "  /learning   내 선택으로 배우기 켜기/끄기 (on|off)\n"
              "  /export     내 데이터 JSON 파일로 받기\n"
              "  /forget     내 데이터 모두 지우기\n"
              "  /help       이 도움말\n"
              "후보를 고르지 않고 새 메시지를 보내면 그 후보들은 넘어가고 새 메시지에 답해.",
        "en": "Talk to me and I offer numbered reply candidates. Pick the one you like and the conversation goes "
              "on with it; every night I learn a little from your picks.\n"
              "  1️⃣ 2️⃣ 3️⃣   pick a candidate\n"
              "  🔄          new candidates\n"
              "  👍 👎       rate the reply you picked\n"
              "  /start      say hello\n"
              "  /persona    list personas, or switch with a name\n"
              "  /reset      start a new conversation (the old one is kept)\n"
              "  /learning   learn from my picks: on or off\n"
              "  /export     your data as a JSON file\n"
              "  /forget     delete all your data\n"
              "  /help       this help\n"
              "A new message without a pick skips those candidates and I answer the new message.",
    },
    "persona_language_hint": {
        "ko": "{persona}은(는) 다른 언어로 대답해. 한국어로 이야기하려면 /persona {suggestion}",
        "en": "{persona} answers in another language. For an English-speaking companion: /persona {suggestion}",
    },
    "persona_language_note": {
        "ko": "{persona}은(는) 다른 언어로 대답해.",
        "en": "{persona} answers in another language.",
    },
    "choose_chat": {
        "ko": "마음에 드는 답장을 골라 줘 (1-{count}). 🔄 다시 뽑기",
        "en": "Pick the reply you like (1-{count}). 🔄 new candidates",
    },
    "thumb_saved": {
        "ko": "평가 고마워! 오늘 밤 배울 때 참고할게.",
        "en": "Thanks! I'll take that into account tonight.",
    },
    "thumb_cleared": {
        "ko": "평가를 지웠어.",
        "en": "Rating removed.",
    },
    "button_unknown": {
        "ko": "이 버튼은 이제 쓸 수 없어. 최근 메시지의 버튼을 눌러 줘.",
        "en": "That button no longer works. Use the buttons of a recent message.",
    },
    "edited_ignored": {
        "ko": "고친 메시지에는 다시 답하지 않아. 바꾼 내용을 새 메시지로 보내 줘!",
        "en": "I don't answer edited messages again. Send the new version as a new message!",
    },
    "private_only": {
        "ko": "이건 나랑 1:1 대화에서만 할 수 있어.",
        "en": "That only works in a private chat with me.",
    },
    "busy": {
        "ko": "지금 말 거는 사람이 너무 많아서 바빠. 잠시 후에 다시 보내 줘!",
        "en": "I'm swamped right now. Please send that again in a moment.",
    },
    "slow_down": {
        "ko": "조금만 천천히! {seconds}초 뒤에 다시 보내 줘.",
        "en": "A little slower, please! Send it again in {seconds} s.",
    },
    "learning_off": {
        "ko": "이제 네 선택으로는 배우지 않을게. 대화는 그대로 계속할 수 있어. (/learning on 으로 다시 켜기)",
        "en": "I won't learn from your picks any more; we can keep chatting. (/learning on turns it back on)",
    },
    "learning_on": {
        "ko": "다시 네 선택으로 배울게. 고마워!",
        "en": "I'll learn from your picks again. Thank you!",
    },
    "learning_status_on": {
        "ko": "지금은 네가 고른 답장으로 배우고 있어. 끄려면 /learning off",
        "en": "I'm learning from your picks. To stop: /learning off",
    },
    "learning_status_off": {
        "ko": "지금은 네 선택으로 배우지 않아. 켜려면 /learning on",
        "en": "I'm not learning from your picks. To resume: /learning on",
    },
    "not_yours": {
        "ko": "이 버튼은 다른 사람 거야.",
        "en": "That button belongs to someone else.",
    },
    "choose": {
        "ko": "마음에 드는 답장 번호를 골라 줘 (1-{count}). 새 메시지를 보내도 되고, /다시 로 다시 뽑을 수도 있어.",
        "en": "Pick the reply you like (1-{count}), send a new message, or /regen for new candidates.",
    },
    "empty_message": {
        "ko": "메시지가 비어 있어. 하고 싶은 말을 적어 줘!",
        "en": "That message is empty. Type something to say!",
    },
    "message_shortened": {
        "ko": "메시지가 너무 길어서 ({length}자) 앞뒤 {limit}자만 읽었어. 전체 내용은 그대로 저장돼 있어.",
        "en": "Your message was very long ({length} characters), so I read only its first and last parts "
              "({limit} characters). The whole message is still saved.",
    },
    "fewer_candidates": {
        "ko": "이번엔 서로 다른 답장을 {count}개밖에 못 만들었어.",
        "en": "This time I could only come up with {count} different replies.",
    },
    "no_reply": {
        "ko": "앗, 답장을 만들지 못했어. 한 번만 다시 보내 줘.",
        "en": "Oops, I couldn't come up with a reply. Please send it again.",
    },
    "pick_out_of_range": {
        "ko": "1부터 {count} 사이의 번호를 골라 줘.",
        "en": "Pick a number from 1 to {count}.",
    },
    "pick_stale": {
        "ko": "그 후보는 지난 거라 이제 고를 수 없어. 가장 최근 후보 중에서 골라 줘.",
        "en": "Those candidates are from earlier and can't be picked any more. Pick from the latest ones.",
    },
    "pick_already": {
        "ko": "이미 {index}번을 골랐어. 대화는 그 답장으로 이어지고 있어.",
        "en": "You already picked {index}; the conversation goes on with that reply.",
    },
    "pick_unknown": {
        "ko": "그 선택지를 찾을 수 없어. 오래됐거나 다른 사람의 선택지야.",
        "en": "I can't find that choice; it is old or it belongs to someone else.",
    },
    "nothing_to_pick": {
        "ko": "지금은 고를 후보가 없어. 메시지를 보내 줘!",
        "en": "There is nothing to pick right now. Send me a message!",
    },
    "nothing_to_regenerate": {
        "ko": "다시 뽑을 메시지가 없어. 먼저 말을 걸어 줘!",
        "en": "There is no message to answer again yet. Say something first!",
    },
    "reset_done": {
        "ko": "새 대화를 시작할게. 지난 대화는 저장돼 있어.",
        "en": "Starting a new conversation. The old one is kept.",
    },
    "persona_list": {
        "ko": "페르소나: {personas} (지금: {current}). /persona 이름 으로 바꿀 수 있어.",
        "en": "Personas: {personas} (now: {current}). Switch with /persona NAME.",
    },
    "persona_changed": {
        "ko": "페르소나를 {name}(으)로 바꿨어. 새 대화가 시작돼.",
        "en": "Switched to {name}. A new conversation begins.",
    },
    "persona_unknown": {
        "ko": "'{key}' 페르소나는 없어. 있는 페르소나: {personas}",
        "en": "There is no persona '{key}'. Available: {personas}",
    },
    "unknown_command": {
        "ko": "모르는 명령이야: {command}. /help 로 명령 목록을 볼 수 있어.",
        "en": "Unknown command: {command}. /help lists the commands.",
    },
    "model_error": {
        "ko": "답장을 만드는 중에 문제가 생겼어. 잠시 후에 다시 해 줘. 보낸 메시지는 저장돼 있어.",
        "en": "Something went wrong while writing replies. Please try again shortly; your message is saved.",
    },
    "text_only": {
        "ko": "아직은 글자로 된 메시지만 읽을 수 있어. 하고 싶은 말을 적어 줘!",
        "en": "I can only read text for now. Tell me in words!",
    },
    "admin_only": {
        "ko": "관리자만 쓸 수 있는 명령이야.",
        "en": "Only admins can use that command.",
    },
    "picked": {
        "ko": "({number}번을 골랐어)",
        "en": "(you picked {number})",
    },
    "training_started": {
        "ko": "지금 학습을 시작할게. 끝나면 결과를 알려 줄게.",
        "en": "Training now; I'll report when it is done.",
    },
    "training_finished": {
        "ko": "학습 끝:\n{result}",
        "en": "Training finished:\n{result}",
    },
    "training_failed": {
        "ko": "학습이 실패했어 (exit {code}). 지금 세대가 계속 답해.\n{result}",
        "en": "Training failed (exit {code}); the serving generation keeps answering.\n{result}",
    },
    "forget_confirm": {
        "ko": "정말 우리 대화, 네가 고른 답장, 너만의 학습 결과를 모두 지울까? 되돌릴 수 없어.",
        "en": "Really delete our conversations, your picks and what I learned from you? This cannot be undone.",
    },
    "forget_done": {
        "ko": "다 지웠어. 다음에 말을 걸면 처음부터 시작할게.",
        "en": "Everything is deleted. Talk to me again and we start fresh.",
    },
    "forget_cancelled": {
        "ko": "지우지 않았어. 그대로 있어!",
        "en": "Nothing was deleted.",
    },
    "forget_type_yes": {
        "ko": "지우려면 yes 를 입력해 줘 (다른 입력은 취소).",
        "en": "Type yes to delete (anything else cancels).",
    },
    "export_saved": {
        "ko": "네 데이터를 {path} 에 JSON 파일로 저장했어.",
        "en": "Your data is saved as a JSON file: {path}",
    },
    "export_ready": {
        "ko": "네 데이터를 JSON 파일로 담았어.",
        "en": "Here is your data as a JSON file.",
    },
    "learning_paused": {
        "ko": "학습을 멈췄어. 대화와 선택은 계속 저장돼.",
        "en": "Learning is paused. Chats and picks are still stored.",
    },
    "learning_resumed": {
        "ko": "학습을 다시 시작했어.",
        "en": "Learning is back on.",
    },
    "goodbye": {
        "ko": "또 와! 기다릴게 ㅎㅎ",
        "en": "See you soon!",
    },
}


def render(key: str, language: str | None, /, **params: object) -> str:
    """The message `key` in `language` (Korean when unknown), filled with `params`."""
    texts = MESSAGES[key]
    return texts.get(language or "ko", texts["ko"]).format(**params)


def with_hint(text: str, hint, language: str | None) -> str:
    """`text` followed by the engine's language hint (a Notice, or None), when there is one."""
    return f"{text}\n\n{render(hint.key, language, **hint.params)}" if hint else text


NUMBERS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣", "5️⃣")


def fit(text: str, limit: int) -> str:
    """`text`, cut with an ellipsis when it is longer than `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def numbered_offer(texts: list[str], notices: list[str], language: str | None, limit: int, gap: str = "\n") -> str:
    """Candidates numbered 1️⃣…, notices above, the "pick one" line below; each candidate is shortened so
    the whole message stays within a platform's `limit`."""
    head = "\n".join(notices)
    room = (limit - len(head) - 200) // max(len(texts), 1)
    lines = [f"{NUMBERS[i]} {fit(text, room)}" for i, text in enumerate(texts)]
    footer = render("choose_chat", language, count=len(texts))
    return fit(gap.join(part for part in (head, gap.join(lines), footer) if part), limit)
