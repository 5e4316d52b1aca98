"""Demo orca-chat conversations: ORCA system prompts and tasks whose answers are checkable functions of the prompt.

Every answer is computed from the question (arithmetic, reversing, sorting, counting, copying, and recalling facts
given in earlier turns), so a tiny model can learn the tasks and a reader can check any output. The system prompt
decides the answer's style, as in Orca: prompts that ask for detail or step-by-step reasoning get a worked answer,
the others a short one.

The system prompts are the sixteen of the Orca paper (Mukherjee et al. 2023, table 2), which orca-chat
(dolphin-derived) uses, the empty one included.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from orca8k.data.demo_text import MOTTO_WORDS, invented_word, number_string

# (system prompt, answer style). Texts as in the Orca paper / the dolphin data, typos included.
SYSTEM_PROMPTS: tuple[tuple[str, str], ...] = (
    ("", "short"),
    ("You are an AI assistant. Provide a detailed answer so user don\u2019t need to search outside to understand the "
     "answer.", "detailed"),
    ("You are an AI assistant. You will be given a task. You must generate a detailed and long answer.", "detailed"),
    ("You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
     "detailed"),
    ("You are an AI assistant that follows instruction extremely well. Help as much as you can.", "short"),
    ("You are an AI assistant that helps people find information. Provide a detailed answer so user don\u2019t need "
     "to search outside to understand the answer.", "detailed"),
    ("You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as you "
     "can. While performing the task think step-by-step and justify your steps.", "detailed"),
    ("You should describe the task and explain your answer. While answering a multiple choice question, first output "
     "the correct answer(s). Then explain why other answers are wrong. Think like you are answering to a five year "
     "old.", "detailed"),
    ("Explain how you used the definition to come up with the answer.", "detailed"),
    ("You are an AI assistant. You should describe the task and explain your answer. While answering a multiple "
     "choice question, first output the correct answer(s). Then explain why other answers are wrong. You might need "
     "to use additional knowledge to answer the question.", "detailed"),
    ("You are an AI assistant that helps people find information. User will you give you a question. Your task is to "
     "answer as faithfully as you can. While answering think step-by-step and justify your answer.", "detailed"),
    ("User will you give you a task with some instruction. Your job is follow the instructions as faithfully as you "
     "can. While answering think step-by-step and justify your answer.", "detailed"),
    ("You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it "
     "provides and how to use those guidelines to find the answer.", "detailed"),
    ("You are an AI assistant, who knows every language and how to translate one language to another. Given a task, "
     "you explain in simple steps what the task is asking, any guidelines that it provides. You solve the task and "
     "then explain how you used the guidelines to solve the task.", "detailed"),
    ("Given a definition of a task and a sample input, break the definition into small parts. Each of those parts "
     "will have some instruction. Explain their meaning by showing an example that meets the criteria in the "
     "instruction. Use the following format: Part #: a key part of the definition. Usage: Sample response that meets "
     "the criteria from the key part. Explain why you think it meets the criteria.", "detailed"),
    ("You are an AI assistant that helps people find information.", "short"),
)

Turn = tuple[str, str]  # (user input, assistant output)


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(MOTTO_WORDS) for _ in range(rng.randrange(low, high + 1))]


def _numbers(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(100) for _ in range(rng.randrange(low, high + 1))]


def _answer(style: str, short: str, steps: list[str]) -> str:
    """Short style: the answer alone. Detailed style: the steps, then `The answer is: <answer>.`"""
    if style == "short":
        return short
    return " ".join(steps) + f" The answer is: {short}."


def task_add(rng: random.Random, style: str) -> tuple[Turn, int]:
    a, b = rng.randrange(1000), rng.randrange(1000)
    s = a + b
    steps = [f"We need to add {a} and {b}.", f"Adding them gives {a} + {b} = {s}."]
    return (f"What is {a} + {b}?", _answer(style, str(s), steps)), s


def task_subtract(rng: random.Random, style: str) -> tuple[Turn, int]:
    a = rng.randrange(1000)
    b = rng.randrange(a + 1)
    d = a - b
    steps = [f"We need to subtract {b} from {a}.", f"Subtracting gives {a} - {b} = {d}."]
    return (f"What is {a} - {b}?", _answer(style, str(d), steps)), d


def task_multiply(rng: random.Random, style: str) -> tuple[Turn, int]:
    a, b = rng.randrange(2, 13), rng.randrange(2, 13)
    p = a * b
    steps = [f"We need to multiply {a} by {b}.", f"{a} times {b} is {a} * {b} = {p}."]
    return (f"What is {a} * {b}?", _answer(style, str(p), steps)), p


def task_reverse(rng: random.Random, style: str) -> tuple[Turn, None]:
    words = _words(rng, 3, 7)
    out = " ".join(reversed(words))
    steps = [f"The words are: {' '.join(words)}.", f"Read from the last word to the first, they are: {out}."]
    return (f"Reverse the order of these words: {' '.join(words)}", _answer(style, out, steps)), None


def task_sort(rng: random.Random, style: str) -> tuple[Turn, None]:
    nums = _numbers(rng, 3, 7)
    out = ", ".join(str(n) for n in sorted(nums))
    steps = [f"The numbers are {', '.join(str(n) for n in nums)}.", f"From the smallest to the largest: {out}."]
    return (f"Sort these numbers from smallest to largest: {', '.join(str(n) for n in nums)}",
            _answer(style, out, steps)), None


def task_count(rng: random.Random, style: str) -> tuple[Turn, int]:
    words = _words(rng, 2, 9)
    n = len(words)
    steps = [f"The list is: {' '.join(words)}.", "Counting them one by one: "
             + ", ".join(f"{w} ({i})" for i, w in enumerate(words, 1)) + "."]
    return (f"How many words are in this list: {' '.join(words)}", _answer(style, str(n), steps)), n


def task_largest(rng: random.Random, style: str) -> tuple[Turn, int]:
    nums = _numbers(rng, 3, 7)
    m = max(nums)
    steps = [f"The numbers are {', '.join(str(n) for n in nums)}.", f"Comparing them, the largest is {m}."]
    return (f"Which is the largest of these numbers: {', '.join(str(n) for n in nums)}?",
            _answer(style, str(m), steps)), m


def task_repeat(rng: random.Random, style: str) -> tuple[Turn, None]:
    text = " ".join(_words(rng, 4, 10))
    steps = ["The task is to repeat the text exactly.", f"The text is: {text}."]
    return (f"Repeat exactly: {text}", _answer(style, text, steps)), None


TASKS: tuple[Callable[[random.Random, str], tuple[Turn, int | None]], ...] = (
    task_add, task_subtract, task_multiply, task_reverse, task_sort, task_count, task_largest, task_repeat,
)


def make_conversation(rng: random.Random) -> dict[str, object]:
    """An orca-chat row: `{"instruction": system prompt, "conversation": [{"input", "output"}, ...]}` (1-6 turns).

    Turns are independent tasks, follow-ups on the previous numeric result (`Now add 7 to that.`), or — in
    conversations that open by giving facts to remember — questions about those facts asked turns later.
    """
    system, style = SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]
    n_turns = (1, 1, 2, 2, 3, 3, 4, 5, 6)[rng.randrange(9)]
    turns: list[Turn] = []
    facts: list[tuple[str, str]] = []
    if n_turns >= 2 and rng.randrange(3) == 0:
        facts = [(invented_word(rng, 2), number_string(rng, 4)) for _ in range(rng.randrange(1, 4))]
        given = "; ".join(f"the code of {name} is {code}" for name, code in facts)
        turns.append((f"Remember these facts: {given}.", f"I will remember: {given}."))
    last: int | None = None
    while len(turns) < n_turns:
        if facts and rng.randrange(2) == 0:
            name, code = facts[rng.randrange(len(facts))]
            short = code
            steps = [f"Earlier you told me that the code of {name} is {code}."]
            turns.append((f"What is the code of {name}?", _answer(style, short, steps)))
            last = None
            continue
        if last is not None and rng.randrange(2) == 0:
            c = rng.randrange(1, 100)
            steps = [f"The previous result was {last}.", f"Adding {c} gives {last} + {c} = {last + c}."]
            turns.append((f"Now add {c} to that.", _answer(style, str(last + c), steps)))
            last += c
            continue
        turn, last = TASKS[rng.randrange(len(TASKS))](rng, style)
        turns.append(turn)
    return {"instruction": system, "conversation": [{"input": q, "output": a} for q, a in turns]}
