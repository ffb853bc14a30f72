"""`counting`: counting items in a list and letters in a word. Answers are whole numbers (stated-number
checker). Levels and their measured greedy accuracy: docs/tasks.md.
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import StatedNumber

_ITEMS = ("apple", "pear", "plum", "fig", "lemon", "grape", "peach", "cherry", "mango", "kiwi", "melon", "lime")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
_OBJECTS = ("pen", "cup", "hat", "ball", "book", "sock", "car", "kite")
_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe")
# Everyday words, 3 to 10 letters; the letters are counted exactly by len() and str.count().
_WORDS = (
    "cat", "dog", "sun", "hat", "pen", "cup", "bus", "box", "tree", "book", "fish", "milk", "door", "rain", "star",
    "ship", "apple", "table", "chair", "house", "water", "green", "bread", "river", "stone", "light", "garden",
    "window", "yellow", "school", "banana", "butter", "summer", "letter", "pepper", "coffee", "balloon", "library",
    "chicken", "kitchen", "morning", "teacher", "elephant", "mountain", "computer", "strawberry", "tomorrow",
    "umbrella", "bookkeeper", "committee", "mississippi", "assessment", "cinnamon", "baggage", "address",
    "pizza", "lemon", "orange", "pencil", "rabbit", "turtle", "monkey", "dinner", "bottle", "cookie", "garage",
    "planet", "rocket", "button", "candle", "castle", "forest", "island", "jacket", "ladder", "mirror", "needle",
    "pillow", "puzzle", "saddle", "tomato", "potato", "zebra", "tiger", "horse", "sheep", "goose", "mouse",
    "grass", "glass", "dress", "street", "cheese", "hello", "spoon", "moon", "floor", "happy", "sunny", "berry",
    "cherry", "carrot", "parrot", "kitten", "mitten",
)


def _coloured(r: random.Random) -> tuple[str, str]:
    # Objects told apart by colour, asked "in total": when probed the model answered "a total of 3 cars"
    # where without "in total" it repeated the list.
    k = r.randint(2, 4)
    obj, name = r.choice(_OBJECTS), r.choice(_NAMES)
    cols = r.sample(_COLOURS, k)
    listed = ", ".join(f"a {c} {obj}" for c in cols[:-1]) + f" and a {cols[-1]} {obj}"
    return f"{name} has {listed}. How many {obj}s does {name} have in total?", str(k)


def _fruits(r: random.Random) -> tuple[str, str]:
    k = r.randint(2, 4)
    xs = r.sample(_ITEMS, k)
    listed = ", ".join(xs)
    q = r.choice((f"How many fruits are there: {listed}?", f"How many fruits are in this list: {listed}?"))
    return q, str(k)


def _long_list(r: random.Random) -> tuple[str, str]:
    k = r.randint(5, 8)
    xs = [r.choice(_ITEMS) for _ in range(k)]
    listed = ", ".join(xs)
    q = r.choice((f"How many items are in this list: {listed}?", f"Count the words in this list: {listed}."))
    return q, str(k)


def _word_length(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    q = r.choice((f'How many letters are in the word "{w}"?', f'How many letters does "{w}" have?',
                  f'How long is the word "{w}" in letters?', f'Count the letters in "{w}".',
                  f'How many letters does the word "{w}" have?'))
    return q, str(len(w))


def _letter_count(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    c = r.choice(sorted(set(w)))
    q = r.choice((f'How many times does the letter "{c}" appear in "{w}"?', f'How many "{c}"s are in "{w}"?',
                  f'Count the letter "{c}" in the word "{w}".'))
    return q, str(w.count(c))


# Levels in the order the default model finds them hard (measured greedy accuracy 0.35 / 0.25 / 0.10 / 0.05 /
# 0.00 on 20 validation prompts each before this order was fixed): most letters occur once in a word, and it
# answers "1 time"; it repeats lists rather than counting them, and spells words with made-up letters.
COUNTING = GeneratedFamily(
    "counting", {1: _letter_count, 2: _fruits, 3: _coloured, 4: _long_list, 5: _word_length}, "Answer briefly.",
    StatedNumber(),
    max_tokens=64,
)
