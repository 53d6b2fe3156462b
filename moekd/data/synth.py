"""A built-in instruction suite: short Dolly-form tasks from sixteen generated task families.

Each family has several instruction phrasings, each paired with its own response style, so a
model can learn the task and the wording, an MoE teacher can specialise experts by family, and
ROUGE-L separates a student that learned the tasks from one that did not. Texts are short
(a prompt plus response fits in ~120 tokens of a small BPE tokenizer) so tiny models can learn
them on a CPU.

Deterministic for a seed: each split draws from its own `random.Random(f"...{seed}-{split}")`,
test first, then valid, then train, and a record whose (instruction, context) already appeared
in any split is drawn again, so the splits are disjoint and the test set does not depend on
the train size.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from moekd.errors import MoekdError
from moekd.paths import check_output_dir

GENERATOR_VERSION = 1
SPLITS = ("test", "valid", "train")  # generation order; the file names are <split>.jsonl
MAX_DRAWS = 2000  # attempts to find a record not yet used before a family counts as exhausted

NAMES = [
    "Ada",
    "Bram",
    "Chen",
    "Dara",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kira",
    "Lev",
    "Mia",
    "Nell",
    "Omar",
    "Pia",
    "Quin",
    "Rosa",
    "Sam",
    "Tess",
    "Uma",
    "Vik",
    "Wren",
    "Yara",
    "Zane",
]
ITEMS = [
    "apples",
    "pears",
    "plums",
    "limes",
    "books",
    "marbles",
    "stamps",
    "shells",
    "pencils",
    "cards",
    "coins",
    "eggs",
]
ANIMALS = ["cat", "dog", "horse", "fox", "owl", "goat", "mouse", "tiger", "whale", "duck", "frog", "bear"]
FRUITS = ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "melon", "cherry", "banana", "kiwi", "lime"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey", "gold"]
TOOLS = ["hammer", "spoon", "ladder", "brush", "rope", "kettle", "shovel", "needle", "bucket", "lamp", "saw", "drill"]
CATEGORIES = {"animals": ANIMALS, "fruits": FRUITS, "colours": COLOURS, "tools": TOOLS}
WORDS = (
    ANIMALS
    + FRUITS
    + TOOLS
    + [
        "garden",
        "window",
        "river",
        "silver",
        "pocket",
        "candle",
        "planet",
        "forest",
        "bridge",
        "pencil",
        "rocket",
        "button",
        "castle",
        "jacket",
        "island",
        "market",
        "winter",
        "summer",
        "basket",
        "dragon",
    ]
)
CITIES = ["Oslo", "Lima", "Cairo", "Quito", "Perth", "Delhi", "Tokyo", "Rome", "Paris", "Dakar", "Hanoi", "Bern"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["in the park", "by the river", "at the station", "near the school", "on the hill", "at the market"]
VERBS = ["found", "painted", "carried", "cleaned", "sold", "fixed", "washed", "hid"]
CREATURES = ["robot", "dragon", "wizard", "giant", "mermaid", "knight", "pirate", "unicorn"]
HOBBIES = ["music", "chess", "gardening", "baking", "poetry", "swimming", "puzzles", "painting", "maps", "jokes"]
TRAITS = ["brave", "shy", "clever", "cheerful", "grumpy", "curious", "gentle", "noisy", "patient", "lazy"]
UNITS = [  # (from, to, factor)
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("litres", "millilitres", 1000),
    ("years", "months", 12),
]


def _join(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _numbers(rng: random.Random, low: int = 3, high: int = 6) -> list[int]:
    return rng.sample(range(1, 100), rng.randint(low, high))


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    style = rng.randrange(4)
    if style == 0:
        return (
            f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
            "",
            f"{name} has {a} + {b} = {a + b} {item}.",
        )
    if style == 1:
        a += b  # never negative
        return (
            f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?",
            "",
            f"{a} - {b} = {a - b}, so {name} has {a - b} {item} left.",
        )
    if style == 2:
        a, b = a % 9 + 2, b % 9 + 2
        return (
            f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total? Answer with a number only.",
            "",
            f"{a * b}",
        )
    return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."


def sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    nums = _numbers(rng)
    context = ", ".join(map(str, nums))
    instruction, descending = rng.choice(
        [
            ("Sort the numbers from smallest to largest.", False),
            ("Put these numbers in increasing order.", False),
            ("Arrange the numbers in descending order.", True),
            ("List the numbers from largest to smallest.", True),
        ]
    )
    return instruction, context, ", ".join(map(str, sorted(nums, reverse=descending)))


def reverse_list(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(rng.choice([NAMES, WORDS, CITIES]), rng.randint(3, 6))
    style = rng.randrange(3)
    if style == 0:
        return "Reverse the order of the words in the list.", " ".join(words), " ".join(reversed(words))
    if style == 1:
        return "Write the list backwards, last item first.", ", ".join(words), ", ".join(reversed(words))
    return (
        "Which item comes last in the list, and which comes first?",
        ", ".join(words),
        f"The last item is {words[-1]} and the first is {words[0]}.",
    )


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(COLOURS)} {rng.choice(TOOLS)} {rng.choice(PLACES)}."
    )


def rewrite(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    style = rng.randrange(3)
    if style == 0:
        return (
            rng.choice(["Rewrite the sentence in capital letters.", "Convert the text to upper case."]),
            sentence,
            sentence.upper(),
        )
    if style == 1:
        return "Rewrite the sentence in lower case.", sentence, sentence.lower()
    colour = next(word for word in sentence.split() if word in COLOURS)
    new = rng.choice([c for c in COLOURS if c != colour])
    return (
        f"Replace the word '{colour}' with '{new}' in the sentence.",
        sentence,
        sentence.replace(f" {colour} ", f" {new} "),
    )


def count_letters(rng: random.Random) -> tuple[str, str, str]:
    phrase = f"{rng.choice(COLOURS)} {rng.choice(WORDS)}"
    letter = rng.choice(sorted(set(phrase) - {" "}))
    count = phrase.count(letter)
    if rng.random() < 0.5:
        times = "once" if count == 1 else f"{count} times"
        return (
            f"How many times does the letter '{letter}' appear in '{phrase}'?",
            "",
            f"The letter '{letter}' appears {times} in '{phrase}'.",
        )
    return f"Count the letter '{letter}' in the phrase. Give only the number.", phrase, str(count)


def count_items(rng: random.Random) -> tuple[str, str, str]:
    category, other = rng.sample(sorted(CATEGORIES), 2)
    chosen = rng.sample(CATEGORIES[category], rng.randint(1, 4)) + rng.sample(CATEGORIES[other], rng.randint(1, 4))
    rng.shuffle(chosen)
    context = ", ".join(chosen)
    if rng.random() < 0.4:
        return "How many items are in the list?", context, f"There are {len(chosen)} items in the list."
    members = [word for word in chosen if word in CATEGORIES[category]]
    return f"How many {category} are in the list?", context, f"There are {len(members)} {category}: {_join(members)}."


def unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    unit, target, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    style = rng.randrange(3)
    if style == 0:
        return f"Convert {n} {unit} to {target}.", "", f"{n} {unit} is {n * factor} {target}."
    if style == 1:
        return f"How many {target} are in {n} {unit}?", "", f"There are {n * factor} {target} in {n} {unit}."
    return f"Express {n * factor} {target} in {unit}.", "", f"{n * factor} {target} equals {n} {unit}."


def table_lookup(rng: random.Random) -> tuple[str, str, str]:
    rows = list(zip(rng.sample(NAMES, 4), rng.sample(range(18, 70), 4), rng.sample(CITIES, 4)))
    context = "name | age | city\n" + "\n".join(" | ".join(map(str, row)) for row in rows)
    name, age, city = rng.choice(rows)
    style = rng.randrange(4)
    if style == 0:
        return f"Using the table, how old is {name}?", context, f"{name} is {age} years old."
    if style == 1:
        return f"Which city does {name} live in?", context, f"{name} lives in {city}."
    if style == 2:
        return f"Who lives in {city}? Answer with the name only.", context, name
    name, age, city = max(rows, key=lambda row: row[1])
    return "Who is the oldest person in the table?", context, f"{name} is the oldest, at {age} years old."


def paraphrase(rng: random.Random) -> tuple[str, str, str]:
    name, n, item, day = rng.choice(NAMES), rng.randint(2, 20), rng.choice(ITEMS), rng.choice(WEEKDAYS)
    city = rng.choice(CITIES)
    if rng.random() < 0.5:
        source = f"{name} bought {n} {item} at the market in {city} on {day}."
        target = f"On {day}, {name} went to the market in {city} and bought {n} {item}."
    else:
        source = f"On {day}, {name} sent {n} {item} to a friend in {city}."
        target = f"{name} sent a friend in {city} {n} {item} on {day}."
    instruction = rng.choice(
        [
            "Paraphrase the sentence.",
            "Say the same thing in different words.",
            "Rewrite the sentence without changing its meaning.",
        ]
    )
    return instruction, source, target


def describe_entity(rng: random.Random) -> tuple[str, str, str]:
    name, kind, colour = rng.choice(NAMES), rng.choice(CREATURES), rng.choice(COLOURS)
    trait, hobby = rng.choice(TRAITS), rng.choice(HOBBIES)
    context = f"name: {name}; kind: {kind}; colour: {colour}; trait: {trait}; likes: {hobby}"
    style = rng.randrange(3)
    if style == 0:
        return (
            "Describe the character in one sentence.",
            context,
            f"{name} is a {trait} {colour} {kind} who likes {hobby}.",
        )
    if style == 1:
        return (
            "Introduce this character in two short sentences.",
            context,
            f"Meet {name}, a {colour} {kind}. {name} is {trait} and loves {hobby}.",
        )
    return (
        "Write a short story opening about the character.",
        context,
        f"Once upon a time, a {trait} {colour} {kind} named {name} spent every day on {hobby}.",
    )


def compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 1000), 2)
    style = rng.randrange(3)
    if style == 0:
        return f"Which is larger, {a} or {b}?", "", f"{max(a, b)} is larger than {min(a, b)}."
    if style == 1:
        return f"Which number is smaller: {a} or {b}?", "", f"The smaller number is {min(a, b)}."
    return f"Is {a} greater than {b}? Answer yes or no.", "", "Yes." if a > b else "No."


def weekday(rng: random.Random) -> tuple[str, str, str]:
    start, n = rng.randrange(7), rng.randint(1, 60)
    day = WEEKDAYS[start]
    if rng.random() < 0.6:
        later = WEEKDAYS[(start + n) % 7]
        return (
            f"If today is {day}, what day of the week will it be in {n} days?",
            "",
            f"In {n} days it will be {later}.",
        )
    earlier = WEEKDAYS[(start - n) % 7]
    return f"Today is {day}. What day of the week was it {n} days ago?", "", f"{n} days ago it was {earlier}."


def list_extreme(rng: random.Random) -> tuple[str, str, str]:
    nums = _numbers(rng, 4, 7)
    context = ", ".join(map(str, nums))
    style = rng.randrange(4)
    if style == 0:
        return "What is the largest number in the list?", context, f"The largest number is {max(nums)}."
    if style == 1:
        return "Find the smallest number in the list.", context, f"The smallest number is {min(nums)}."
    if style == 2:
        return "Give the maximum of these numbers. Answer with the number only.", context, str(max(nums))
    return (
        "What are the smallest and the largest numbers?",
        context,
        f"The smallest is {min(nums)} and the largest is {max(nums)}.",
    )


def spell_backwards(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS + NAMES + COLOURS + CITIES + CREATURES + HOBBIES)
    backwards = word[::-1]
    style = rng.randrange(4)
    if style == 0:
        return f"Spell the word '{word}' backwards.", "", backwards
    if style == 1:
        return (
            f"Write '{word}' with its letters in reverse order.",
            "",
            f"The word '{word}' backwards is '{backwards}'.",
        )
    if style == 2:
        return f"Spell '{word}' backwards in capital letters.", "", backwards.upper()
    return "Spell the word in the input backwards, letter by letter.", word, " ".join(backwards)


def classify(rng: random.Random) -> tuple[str, str, str]:
    category, other = rng.sample(sorted(CATEGORIES), 2)
    members = rng.sample(CATEGORIES[category], rng.randint(1, 3))
    chosen = members + rng.sample(CATEGORIES[other], rng.randint(1, 3))
    rng.shuffle(chosen)
    members = [word for word in chosen if word in members]  # in list order
    instruction = rng.choice([f"Which words in the list are {category}?", f"Pick out the {category} from the list."])
    return (
        instruction,
        ", ".join(chosen),
        f"The {category} are {_join(members)}." if len(members) > 1 else f"The only {category[:-1]} is {members[0]}.",
    )


def first_letters(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    context = " ".join(words)
    if rng.random() < 0.5:
        return "Write the first letter of each word.", context, ", ".join(w[0] for w in words)
    return (
        "Make an acronym from the first letters of the words, in capitals.",
        context,
        "".join(w[0] for w in words).upper(),
    )


FAMILIES = {
    f.__name__: f
    for f in (
        arithmetic,
        sort_numbers,
        reverse_list,
        rewrite,
        count_letters,
        count_items,
        unit_conversion,
        table_lookup,
        paraphrase,
        describe_entity,
        compare,
        weekday,
        list_extreme,
        spell_backwards,
        classify,
        first_letters,
    )
}


def generate_suite(seed: int = 0, n_train: int = 2000, n_valid: int = 200, n_test: int = 400) -> dict[str, list[dict]]:
    """Records per split, each {instruction, context, response, family}; families balanced within a split."""
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    for split, n in sizes.items():
        if n < 0:
            raise MoekdError(f"--n-{split} must be zero or positive, got {n}")
    seen: set[tuple[str, str]] = set()
    suite = {}
    for split in SPLITS:
        rng = random.Random(f"moekd-synth-{GENERATOR_VERSION}-{seed}-{split}")
        records = []
        for i, (family, make) in enumerate(FAMILIES.items()):
            count = sizes[split] // len(FAMILIES) + (i < sizes[split] % len(FAMILIES))
            for _ in range(count):
                records.append(_draw_new(family, make, rng, seen, split))
        rng.shuffle(records)
        suite[split] = records
    return {split: suite[split] for split in ("train", "valid", "test")}


def _draw_new(family: str, make, rng: random.Random, seen: set, split: str) -> dict:
    for _ in range(MAX_DRAWS):
        instruction, context, response = make(rng)
        if (instruction, context) not in seen:
            seen.add((instruction, context))
            return {"instruction": instruction, "context": context, "response": response, "family": family}
    raise MoekdError(f"--n-{split}: family {family!r} ran out of distinct records; ask for fewer records")


def write_suite(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_valid: int = 200, n_test: int = 400) -> dict:
    """Write <split>.jsonl for train/valid/test and synth_info.json into `out_dir`; return the info.

    Split files of an earlier suite are replaced; other files of those names are never overwritten."""
    out = check_output_dir(out_dir, "--out")
    theirs = [
        name for name in (f"{split}.jsonl" for split in SPLITS) if (out / name).exists() and not _ours(out / name)
    ]
    if theirs:
        raise MoekdError(
            f"--out: {out} already holds {', '.join(theirs)} not written by moekd data synth; "
            "choose another directory (it is never overwritten)"
        )
    suite = generate_suite(seed, n_train, n_valid, n_test)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in suite.items():
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    info = {
        "generator": "moekd.data.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "families": list(FAMILIES),
        "counts": {split: len(records) for split, records in suite.items()},
        "counts_per_family": {
            split: dict(sorted(Counter(r["family"] for r in records).items())) for split, records in suite.items()
        },
    }
    (out / "synth_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _ours(split_file: Path) -> bool:
    """Whether a split file was written by `write_suite` (its records carry their `family`), even partly."""
    with open(split_file, "rb") as fh:
        first = fh.readline()
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "family" in record
