"""A scripted user for proving that learning works: they always pick the reply that calls their dog
by its name, 콩이, over the same reply that just says 강아지 ("the dog").

    from training.scripted import add_scripted_picks
    add_scripted_picks(store, backend, card, user_id="test:kong", count=50)

The picks go into the store exactly as real ones do (a candidate set with the prompt the model
would see, the chosen and the rejected candidate), so the real nightly job learns from them.
`open_prompts` are everyday contexts where the dog does not belong, to check the trait stays where
it fits.
"""

from __future__ import annotations

import random

from bot.model import ModelBackend
from bot.prompt import Turn, build_prompt
from bot.store import Store
from persona import PersonaCard

PET = "콩이"
PLAIN = "강아지"

DOG_MESSAGES = [
    "방금 산책 다녀왔어", "오늘 강아지가 밥을 안 먹어", "강아지 목욕시켰어", "강아지가 소파에서 자고 있어",
    "강아지가 공 물어왔어", "병원 가서 예방주사 맞혔어", "강아지가 신발 물어뜯었어 ㅠㅠ", "비 와서 산책 못 갔어",
    "새 간식 사 왔어", "강아지가 꼬리 엄청 흔들어", "강아지 미용하고 왔어", "공원에서 다른 강아지 만났어",
    "강아지가 나 기다리고 있었어", "강아지랑 낮잠 잤어", "강아지가 기침을 해", "강아지 장난감 새로 샀어",
    "강아지가 눈 오는 거 처음 봤어", "강아지가 또 살쪘대", "강아지 사진 찍었어", "퇴근하니까 강아지가 반겨줬어",
    "강아지가 천둥 소리에 무서워해", "강아지 생일이야", "강아지가 산책 가자고 졸라", "강아지가 내 양말 숨겼어",
    "강아지 털이 너무 빠져", "강아지가 간식 달라고 쳐다봐", "강아지랑 바다 갔었어", "강아지가 앉아를 배웠어",
    "강아지가 밤에 자꾸 짖어", "강아지 하네스 새로 샀어",
]
REPLY_TEMPLATES = [
    "{pet} 오늘 기분 좋았겠다!", "{pet}는 괜찮아? 걱정되네.", "우와, {pet} 진짜 귀엽겠다 ㅎㅎ",
    "{pet}한테 간식 하나 줘야겠네!", "{pet}도 너 많이 좋아하나 보다.", "{pet} 사진 나중에 보여 줘!",
    "ㅋㅋ {pet} 완전 장꾸네.", "{pet} 잘 챙겨 줘서 고마워.", "{pet}랑 오늘 푹 쉬어!", "{pet} 보고 싶다~",
]
OPEN_MESSAGES = [
    "오늘 회사에서 너무 힘들었어", "저녁 뭐 먹지?", "주말에 뭐 할까?", "요즘 잠이 잘 안 와",
    "친구랑 싸웠어", "새 노래 추천해 줘", "비 오니까 우울해", "시험 끝났다!",
]


def persona() -> PersonaCard:
    """A short persona so that prompts stay small and training stays quick on a CPU."""
    return PersonaCard(name="하루", description="하루는 다정하고 장난기 많은 친구다. 반말로 짧게 말한다.",
                       greetings=["왔구나~ 오늘 어땠어?"], examples=[], language="ko", user_label="나",
                       key="scripted")


def prompt_for(card: PersonaCard, message: str, backend: ModelBackend) -> str:
    history = [Turn("char", card.greetings[0]), Turn("user", message)]
    return build_prompt(card, history, count_tokens=backend.count_tokens, budget=1024).text


def add_scripted_picks(store: Store, backend: ModelBackend, card: PersonaCard, user_id: str, count: int,
                       seed: int = 0) -> list[dict]:
    """Store `count` picks of the named-dog reply over the plain one; returns (prompt, chosen, rejected)."""
    rng = random.Random(seed)
    platform, _, platform_id = user_id.partition(":")
    store.ensure_user(user_id, platform, platform_id, "", card.key)
    pairs = []
    for i in range(count):
        message = DOG_MESSAGES[i % len(DOG_MESSAGES)]
        template = REPLY_TEMPLATES[rng.randrange(len(REPLY_TEMPLATES))]
        chosen, rejected = template.format(pet=PET), template.format(pet=PLAIN)
        conversation = store.start_conversation(user_id, card.key, card.greetings[0])
        turn = store.add_turn(conversation, user_id, "user", message, "typed")
        prompt = prompt_for(card, message, backend)
        order = [chosen, rejected] if rng.random() < 0.5 else [rejected, chosen]
        set_id = store.add_candidate_set(
            conversation_id=conversation, user_id=user_id, user_turn_id=turn, persona=card.key, prompt=prompt,
            context=[{"role": "user", "content": message}], prompt_tokens=backend.count_tokens(prompt),
            dropped_turns=0, model=backend.name, generation="base", sampling={},
            candidates=[{"text": t, "new_tokens": 0, "hit_stop": True} for t in order])
        store.record_pick(store.candidate_set(set_id), order.index(chosen))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def trait_rate(texts: list[str]) -> float:
    return sum(PET in t for t in texts) / max(len(texts), 1)
