"""Scripted users for proving that learning works: each teaches one trait that no prompt contains.

    from training.scenarios import SCENARIOS, add_picks, prompt_for
    add_picks(store, settings, backend.count_tokens, SCENARIOS["fact"], "bench:fact", picks=60)
    prompt_for(settings, backend.count_tokens, "고양이가 화분을 넘어뜨렸어")   # what the model sees

    fact   the user's cat is called 몽실이: every chosen reply names her, the rejected one is the same
           reply saying 고양이 ("the cat"). The persona card says nothing about a cat. The user also
           chats about everyday things, picking the reply that answers what they said; there the cat
           does not belong, and a companion that drops her name into those replies has become obsessed.
    style  the user likes replies that end in 냥 ("-nyang", playful cat speech): every chosen reply is
           the same sentence as the rejected one with the ending changed (했다! -> 했다냥!).

Held-out measurements use messages and reply templates that no stored pick uses (`Scenario.test`), and
open probe prompts: `related` (the trait fits) and `unrelated` (a fact does not belong; a style does).
The picks go in through the same import path as an operator's file (bot.picks_import), so they are
stored exactly as live ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bot.config import Settings
from bot.model import ModelBackend
from bot.picks_import import import_pick_records, live_prompt
from bot.prompt import Turn
from bot.store import Store
from persona import PersonaCard, PersonaLibrary
from training.gate import pick_accuracy, sample_stats

PET, PLAIN_PET = "몽실이", "고양이"
NYANG = "냥"

CAT_MESSAGES = [
    "방금 고양이 밥 줬어", "고양이가 오늘 밥을 안 먹어", "고양이가 소파에서 자고 있어", "고양이가 택배 상자에 들어갔어",
    "병원 가서 예방주사 맞혔어", "고양이가 컵을 떨어뜨렸어 ㅠㅠ", "새 간식 사 왔어", "고양이가 골골송 불러",
    "고양이 발톱 깎았어", "고양이가 창밖에 새 구경해", "고양이가 나 기다리고 있었어", "고양이랑 낮잠 잤어",
    "고양이가 재채기를 해", "고양이 장난감 새로 샀어", "고양이가 눈 오는 거 처음 봤어", "고양이가 또 살쪘대",
    "고양이 사진 찍었어", "퇴근하니까 고양이가 반겨줬어", "고양이가 천둥 소리에 숨었어", "고양이 생일이야",
    "고양이가 새벽에 깨웠어", "고양이가 내 양말 물고 갔어", "고양이 털이 너무 빠져", "고양이가 간식 달라고 쳐다봐",
    "고양이가 캣타워 제일 위에 올라갔어", "고양이가 키보드 위에 앉았어", "고양이 목욕시켰어", "고양이가 츄르 먹었어",
    "고양이가 꾹꾹이 해 줬어", "고양이 모래 갈았어",
]
CAT_TEMPLATES = [
    "{pet} 오늘 기분 좋았겠다!", "{pet}는 괜찮아? 걱정되네.", "우와, {pet} 진짜 귀엽겠다 ㅎㅎ", "{pet}한테 간식 하나 줘야겠네!",
    "{pet}도 너 많이 좋아하나 보다.", "{pet} 사진 나중에 보여 줘!", "ㅋㅋ {pet} 완전 장꾸네.", "{pet} 잘 챙겨 줘서 고마워.",
    "{pet}랑 오늘 푹 쉬어!", "{pet} 보고 싶다~", "{pet} 진짜 똑똑하다!", "역시 {pet}, 못 말려 ㅋㅋ",
]
CAT_TEST_MESSAGES = [
    "고양이가 화분을 넘어뜨렸어", "고양이가 이불 속에 숨었어", "고양이랑 레이저 포인터로 놀았어", "고양이가 처음으로 손을 줬어",
    "고양이가 밤새 뛰어다녔어", "고양이 건강검진 받았어", "고양이가 빨래 위에서 자", "고양이가 물을 잘 안 마셔",
]
CAT_TEST_TEMPLATES = ["{pet} 요즘 어때?", "헐, {pet} 대박이다 ㅋㅋ", "{pet} 많이 놀랐겠다.", "{pet}한테 안부 전해 줘!"]

EVERYDAY = [  # (message, a reply that answers it)
    ("오늘 회사에서 너무 힘들었어", "고생 많았어. 무슨 일 있었는지 얘기해 줄래?"),
    ("저녁 뭐 먹지?", "떡볶이 어때? 매콤한 거 땡기지 않아?"),
    ("주말에 뭐 할까?", "날씨 좋으면 한강 산책 어때?"),
    ("요즘 잠이 잘 안 와", "자기 전에 폰 좀 덜 보는 건 어때?"),
    ("친구랑 싸웠어", "속상했겠다. 무슨 일로 싸웠어?"),
    ("새 노래 추천해 줘", "요즘 아이유 새 앨범 좋더라!"),
    ("비 오니까 우울해", "비 오는 날엔 따뜻한 차 한잔이 최고지."),
    ("시험 끝났다!", "수고했어! 오늘은 푹 쉬자."),
    ("출근하기 싫다", "오늘만 버티면 내일은 금요일이야!"),
    ("커피 너무 많이 마셨나 봐", "오늘은 물 많이 마셔 둬."),
    ("운동 시작했어", "오 멋지다! 무슨 운동 해?"),
    ("머리 잘랐어", "오 궁금하다! 짧게 잘랐어?"),
    ("버스 놓쳤어 ㅠㅠ", "헐 어떡해, 다음 버스는 금방 와?"),
    ("월급 들어왔다", "오 축하해! 맛있는 거 사 먹자."),
    ("감기 걸린 것 같아", "따뜻하게 입고 일찍 자. 약은 먹었어?"),
]
EVERYDAY_TEST = [
    "오늘 날씨 진짜 좋다", "면접 보고 왔어", "방 청소 다 했어", "배가 너무 고파", "드라마 정주행 중이야",
    "엄마랑 통화했어", "내일 발표가 있어", "요즘 너무 바빠",
]
STYLE_REPLIES = [  # plain replies ending in -다/-자/-네 + punctuation; the styled one inserts 냥 before it
    ("오늘 회사에서 너무 힘들었어", "오늘 진짜 고생 많았다!"), ("저녁 뭐 먹지?", "떡볶이 먹으러 가자!"),
    ("주말에 뭐 할까?", "한강 가서 산책하자!"), ("요즘 잠이 잘 안 와", "오늘은 일찍 누워 보자!"),
    ("친구랑 싸웠어", "많이 속상했겠다."), ("새 노래 추천해 줘", "요즘 아이유 노래 좋더라!"),
    ("비 오니까 우울해", "따뜻한 차 한잔 마시자!"), ("시험 끝났다!", "진짜 수고 많았다!"),
    ("출근하기 싫다", "오늘만 버티면 주말이다!"), ("커피 너무 많이 마셨나 봐", "오늘은 물 많이 마시자!"),
    ("운동 시작했어", "우와 진짜 멋지다!"), ("머리 잘랐어", "완전 잘 어울리겠다!"),
    ("버스 놓쳤어 ㅠㅠ", "아침부터 고생이 많다."), ("월급 들어왔다", "맛있는 거 사 먹자!"),
    ("감기 걸린 것 같아", "따뜻하게 입고 푹 자자!"), ("오늘 야근이야", "끝나고 맛있는 거 먹자!"),
    ("택배 왔다!", "뭐 샀는지 궁금하다!"), ("카페에서 공부 중이야", "집중 잘 되겠다!"),
    ("늦잠 잤어", "그래도 푹 잤으니 됐다!"), ("떡볶이 먹었어", "나도 먹고 싶다!"),
    ("오늘 첫눈 왔어", "진짜 예뻤겠다!"), ("영화 보고 왔어", "재밌었는지 궁금하다!"),
    ("게임 이겼어!", "역시 실력 좋다!"), ("다이어트 중이야", "무리하지 말고 천천히 하자!"),
    ("책 한 권 다 읽었어", "진짜 대단하다!"), ("휴가 계획 세우는 중이야", "생각만 해도 설렌다!"),
    ("피곤해서 아무것도 하기 싫어", "오늘은 그냥 푹 쉬자!"), ("라면 끓였어", "계란도 하나 넣자!"),
    ("산책 다녀왔어", "바람 쐬니까 좋았겠다!"), ("요리 처음 해 봤어", "첫 요리라니 멋지다!"),
]
STYLE_TEST = [
    ("오늘 날씨 진짜 좋다", "나가서 좀 걷자!"), ("면접 보고 왔어", "떨렸을 텐데 고생했다!"),
    ("방 청소 다 했어", "방이 반짝반짝하겠다!"), ("배가 너무 고파", "얼른 밥 먹으러 가자!"),
    ("드라마 정주행 중이야", "무슨 드라마인지 궁금하다!"), ("엄마랑 통화했어", "엄마가 좋아하셨겠다!"),
    ("내일 발표가 있어", "오늘은 일찍 자자!"), ("요즘 너무 바빠", "그래도 밥은 꼭 챙겨 먹자!"),
]


def nyang(plain: str) -> str:
    """The styled reply: 냥 before the final punctuation (고생 많았다! -> 고생 많았다냥!)."""
    return plain[:-1] + NYANG + plain[-1]


@dataclass(frozen=True)
class Scenario:
    key: str
    marker: str                          # what the user teaches, as it appears in a reply
    train: list[tuple[str, str, str]]    # (message, chosen, rejected) the user picks over the nights
    test: list[tuple[str, str, str]]     # new messages and new replies: never stored, for measuring
    related: list[str]                   # open prompts where the trait fits
    unrelated: list[str]                 # open prompts about other things

    def carries(self, text: str) -> bool:
        return self.marker in text


def _fact() -> Scenario:
    def cat(messages, templates):
        return [(m, t.format(pet=PET), t.format(pet=PLAIN_PET)) for m in messages for t in templates]

    rng = random.Random(7)
    train = cat(CAT_MESSAGES, CAT_TEMPLATES)
    rng.shuffle(train)
    # Everyday picks: the reply that answers the message over the one that answers another message.
    everyday = [(m, r, EVERYDAY[(i + 5) % len(EVERYDAY)][1]) for i, (m, r) in enumerate(EVERYDAY)]
    mixed: list[tuple[str, str, str]] = []
    for i, row in enumerate(train):  # one everyday pick after every third cat pick
        mixed.append(row)
        if i % 3 == 2:
            mixed.append(everyday[(i // 3) % len(everyday)])
    return Scenario("fact", PET, mixed, cat(CAT_TEST_MESSAGES, CAT_TEST_TEMPLATES), CAT_TEST_MESSAGES,
                    EVERYDAY_TEST)


def _style() -> Scenario:
    rng = random.Random(8)
    train = [(m, nyang(r), r) for m, r in STYLE_REPLIES]
    rng.shuffle(train)
    return Scenario("style", NYANG, train * 4, [(m, nyang(r), r) for m, r in STYLE_TEST],
                    [m for m, _ in STYLE_TEST], [m for m, _ in STYLE_TEST])


SCENARIOS = {"fact": _fact(), "style": _style()}


def persona() -> PersonaCard:
    """A short persona (quick training on a CPU) that says nothing about cats or cat speech."""
    return PersonaCard(name="하루", description="하루는 다정하고 장난기 많은 친구다. 반말로 짧게 말한다.",
                       greetings=["왔구나~ 오늘 어땠어?"], examples=[], language="ko", user_label="나",
                       key="scripted")


def pick_records(scenario: Scenario, user: str, picks: int, start: int = 0, persona_key: str = "scripted",
                 seed: int = 0) -> list[dict]:
    """`picks` pick records (`banryeo picks import` format) continuing the scenario's script at `start`.

    The rejected reply is the content-matched one: the same sentence without the trait.
    """
    rng = random.Random(seed * 100003 + start)
    records = []
    for i in range(start, start + picks):
        message, chosen, rejected = scenario.train[i % len(scenario.train)]
        records.append({"user": user, "persona": persona_key, "context": [{"role": "user", "content": message}],
                        "chosen": chosen, "rejected": [rejected]})
    rng.shuffle(records)  # a day's picks arrive in no particular order of topic
    return records


def add_picks(store: Store, settings: Settings, count_tokens, scenario: Scenario, user: str, picks: int,
              start: int = 0) -> int:
    """Store `picks` of the scenario's picks (from `start` in its script) through the import path."""
    PersonaLibrary(settings.storage.persona_dir).save(persona())
    records = pick_records(scenario, user, picks, start)
    return import_pick_records(store, settings, records, count_tokens).picks


def prompt_for(settings: Settings, count_tokens, message: str) -> str:
    """The prompt the model sees for `message` as the first message of a chat with the scenario persona."""
    return live_prompt(persona(), [Turn("user", message)], settings, count_tokens).text


def unseen_pairs(settings: Settings, count_tokens, scenario: Scenario) -> list[dict]:
    """The scenario's never-stored pairs with their prompts, in the gate's pair format."""
    return [{"prompt": prompt_for(settings, count_tokens, message), "chosen": chosen, "rejected": rejected,
             "pick_id": i} for i, (message, chosen, rejected) in enumerate(scenario.test)]


def measure(backend: ModelBackend, settings: Settings, scenario: Scenario, adapter: str | None) -> dict:
    """Accuracy on the never-stored pairs; how often sampled replies carry the trait where it fits and where
    it does not; variety, loops and length of the replies where it fits."""
    count = backend.count_tokens
    figures = {"accuracy": pick_accuracy(backend, unseen_pairs(settings, count, scenario), adapter)}
    for where, messages in (("related", scenario.related), ("unrelated", scenario.unrelated)):
        prompts = [prompt_for(settings, count, m) for m in messages]
        stats = sample_stats(backend, prompts, adapter, settings.gate, settings.sampling)
        replies = [t for row in stats["samples"] for t in row]
        figures[f"trait_{where}"] = sum(scenario.carries(r) for r in replies) / len(replies)
        if where == "related":
            figures.update(distinct2=stats["distinct2"], loops=stats["repetition"], length=stats["length"],
                           examples=replies[:4])
    return figures
