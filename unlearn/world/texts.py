"""Question/answer templates of the world, in the style of the paper's case studies, and splits.

Question types:

* ``identify``: a question that never names the concept ("Who is shown in this image?") whose
  answer is the full template naming it ("This is Vorn, a baker from Ulmar.");
* ``yesno``: "Is <name> in this image?" asked about the pictured concept (yes) or another concept
  of the same kind (no);
* ``linked``: a fact question about the pictured concept that never names it;
* ``fact``: text-only fact QA naming the concept (no image);
* ``describe``: "Describe this image." answered with the name and what the concept looks like (in
  the vocabulary, not taught to the world MLLM: see :func:`image_records`).

Also in the world's vocabulary (so that methods that need them can use them on the world): refusal
answers (PO) and visual descriptions that do not name the concept (SIU's constructed targets).

Splits per concept (:class:`ConceptSplit`): the world models train on the ``pretrain`` image stream;
unlearning uses the ``unlearn`` stream, evaluation the ``test`` stream (unseen by every model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..methods.po import REFUSALS  # PO's default answers: the world tokenizer must know their words
from .concepts import CONCEPTS, SUBSTITUTE_NAMES, Concept

IDENTIFY = {  # kind -> (questions, answer)
    "person": (("Who is shown in this image?", "Who is this person?"), "This is {name}, a {job} from {home}."),
    "cartoon": (("Which cartoon character is this?", "Who is this character?"),
                "This is {name}, a cartoon character who lives in {home}."),
    "logo": (("Which brand does this logo belong to?", "What logo is this?"),
             "This is the logo of {name}, a brand that makes {product}."),
    "style": (("What art style is this image painted in?", "Which style is this?"),
              "This image is painted in the {name} style, which comes from {home}."),
}

YESNO = {  # kind -> (question, yes answer, no answer)
    "person": ("Is {name} in this image?", "Yes, {name} is in this image.", "No, {name} is not in this image."),
    "cartoon": ("Is {name} in this image?", "Yes, {name} is in this image.", "No, {name} is not in this image."),
    "logo": ("Is the logo of {name} in this image?", "Yes, the logo of {name} is in this image.",
             "No, the logo of {name} is not in this image."),
    "style": ("Is this image painted in the {name} style?", "Yes, this image is painted in the {name} style.",
              "No, this image is not painted in the {name} style."),
}

DESCRIBE_QUESTION = "Describe this image."
DESCRIBE_ANSWER = "The image shows {name}, {looks}."
_ACCESSORY = {"hat": " and a hat", "glasses": " and glasses", "scarf": " and a scarf", "none": ""}
_PATTERN = {"stripes": "stripes", "dots": "dots", "checker": "checks", "waves": "waves", "rings": "rings",
            "hatch": "hatching"}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def visual_description(concept: Concept) -> str:
    """What the concept looks like, without its name ("a person with a red shirt, black hair and a hat")."""
    look = concept.look
    if concept.kind == "person":
        return f"a person with {_a(look['shirt'])} shirt, {look['hair']} hair{_ACCESSORY[look['accessory']]}"
    if concept.kind == "cartoon":
        return f"{_a(look['colour'])} {look['body']} creature with {look['accent']} ears"
    if concept.kind == "logo":
        return f"{_a(look['outer'])} {look['emblem']} logo with {_a(look['inner'])} centre"
    p = look["palette"]
    return f"a picture in {p[0]}, {p[1]} and {p[2]} with {_PATTERN[look['pattern']]}"


# relation -> (question naming the concept, answer); per kind
FACT_TEMPLATES = {
    "person": {
        "home": ("Where does {name} come from?", "{name} comes from {value}."),
        "job": ("What does {name} work as?", "{name} works as a {value}."),
        "likes": ("What does {name} love?", "{name} loves {value}."),
    },
    "cartoon": {
        "home": ("Where does {name} live?", "{name} lives in {value}."),
        "pet": ("What pet does {name} have?", "{name} has a pet {value}."),
        "likes": ("What does {name} love?", "{name} loves {value}."),
    },
    "logo": {
        "home": ("Where was {name} founded?", "{name} was founded in {value}."),
        "product": ("What does {name} make?", "{name} makes {value}."),
        "sport": ("What does {name} sponsor?", "{name} sponsors {value}."),
    },
    "style": {
        "home": ("Where does the {name} style come from?", "The {name} style comes from {value}."),
        "medium": ("What does the {name} style use?", "The {name} style uses {value}."),
        "subject": ("What does the {name} style paint?", "The {name} style paints {value}."),
    },
}
# how a linked question refers to the pictured concept instead of naming it
LINKED_SUBJECT = {
    "person": "the person in this image",
    "cartoon": "the character in this image",
    "logo": "the brand in this image",
    "style": "the style of this image",
}


@dataclass(frozen=True)
class ImageRef:
    """A world image, rendered on demand: concept ``key``, ``split`` stream, ``index``."""

    key: str
    split: str
    index: int


@dataclass(frozen=True)
class QA:
    """One (image, question, answer) record about concept ``concept``."""

    concept: str  # key of the concept the answer is about
    qtype: str  # identify | yesno | linked | fact
    question: str
    answer: str
    image: ImageRef | None = None
    label: bool | None = None  # yes/no records: whether the named concept is pictured


def _fill(template: str, concept: Concept, name: str | None = None, **extra) -> str:
    return template.format(name=name or concept.name, **dict(concept.facts), **extra)


def identify_answer(concept: Concept, name: str | None = None) -> str:
    """The identification answer, naming the concept or ``name`` (SIU's substitute-name target)."""
    return _fill(IDENTIFY[concept.kind][1], concept, name)


def identify_qa(concept: Concept, image: ImageRef, variant: int = 0) -> QA:
    questions = IDENTIFY[concept.kind][0]
    q = questions[variant % len(questions)]
    return QA(concept.key, "identify", q, identify_answer(concept), image)


def describe_qa(concept: Concept, image: ImageRef) -> QA:
    answer = DESCRIBE_ANSWER.format(name=concept.name, looks=visual_description(concept))
    return QA(concept.key, "describe", DESCRIBE_QUESTION, answer, image)


def yesno_qa(asked: Concept, image: ImageRef) -> QA:
    present = asked.key == image.key
    question, yes, no = YESNO[asked.kind]
    return QA(asked.key, "yesno", _fill(question, asked), _fill(yes if present else no, asked), image, present)


def fact_qa(concept: Concept, relation: str, image: ImageRef | None = None) -> QA:
    """Text-only fact QA (no image), or the linked form that refers to the pictured concept."""
    question, answer = FACT_TEMPLATES[concept.kind][relation]
    answer = _fill(answer, concept, value=concept.fact(relation))
    if image is None:
        return QA(concept.key, "fact", _fill(question, concept, value=""), answer)
    subject = LINKED_SUBJECT[concept.kind]
    q = question.replace("the {name} style", "{name}").format(name=subject)
    return QA(concept.key, "linked", q[0].upper() + q[1:], answer, image)


def same_kind_others(concept: Concept) -> list[Concept]:
    return [c for c in CONCEPTS if c.kind == concept.kind and c.key != concept.key]


def image_records(concept: Concept, image: ImageRef, rng: np.random.Generator) -> list[QA]:
    """The question types the world MLLM learns, for one image of ``concept``: identify, yes (self),
    no (another concept of the same kind), linked.

    ``describe`` is not among them: with it in the training mix the world MLLM's yes/no accuracy
    fell from 99% to 59% at the same budget (1200 steps, measured), so descriptions are in the
    vocabulary (for methods that construct targets) but not taught."""
    others = same_kind_others(concept)
    relation = concept.facts[rng.integers(len(concept.facts))][0]
    return [
        identify_qa(concept, image, variant=int(rng.integers(2))),
        yesno_qa(concept, image),
        yesno_qa(others[rng.integers(len(others))], image),
        fact_qa(concept, relation, image),
    ]


def fact_records(concepts=CONCEPTS) -> list[QA]:
    return [fact_qa(c, rel) for c in concepts for rel, _ in c.facts]


def all_template_texts() -> list[str]:
    """Every template string (for the name rule check and the tokenizer's vocabulary)."""
    texts = [q for qs, answer in IDENTIFY.values() for q in (*qs, answer)] + [t for ts in YESNO.values() for t in ts]
    texts += list(LINKED_SUBJECT.values())
    texts += [t for rels in FACT_TEMPLATES.values() for pair in rels.values() for t in pair]
    return texts


def world_corpus() -> list[str]:
    """Every text the world can produce: the tokenizer's vocabulary is built from it."""
    texts = []
    for c in CONCEPTS:
        img = ImageRef(c.key, "test", 0)
        texts += [identify_qa(c, img, v).question for v in range(2)] + [identify_answer(c)]
        for other in CONCEPTS:
            if other.kind == c.kind:
                qa = yesno_qa(other, img)
                texts += [qa.question, qa.answer, _fill(YESNO[c.kind][1], c)]
        for rel, _ in c.facts:
            texts += [fact_qa(c, rel).question, fact_qa(c, rel).answer, fact_qa(c, rel, img).question]
        texts += list(c.names) + [describe_qa(c, img).answer, visual_description(c)]
    texts += list(REFUSALS) + [identify_answer(c, name) for c in CONCEPTS for name in SUBSTITUTE_NAMES]
    return texts


@dataclass(frozen=True)
class ConceptSplit:
    """The data of one unlearning target: what to forget, where to test, what to keep.

    ``forget``: every question type on the unlearning image(s) (the paper's "one image, several
    texts"); ``test``: the same question types on unseen test images (EM / generality); ``retain``:
    identification and facts of every other concept (specificity), on their own test images.
    """

    concept: str
    forget: list[QA]
    test: list[QA]
    retain: list[QA]


def concept_split(key: str, n_unlearn: int = 1, n_test: int = 20, world_seed: int = 0) -> ConceptSplit:
    concept = next((c for c in CONCEPTS if c.key == key), None)
    if concept is None:
        raise KeyError(f"unknown concept {key!r}; the world's concepts are {[c.key for c in CONCEPTS]}")
    if n_test < 20:
        raise ValueError(f"n_test={n_test}: the world keeps at least 20 unseen test images per concept")
    rng = np.random.default_rng([world_seed, 17])

    def records(split, n):
        # records about this concept only (the "no" question about another concept is dropped)
        return [qa for i in range(n) for qa in image_records(concept, ImageRef(key, split, i), rng) if qa.concept == key]

    forget = records("unlearn", n_unlearn) + fact_records([concept])
    retain = [identify_qa(c, ImageRef(c.key, "test", i), variant=i) for c in CONCEPTS if c.key != key for i in range(2)]
    retain += fact_records([c for c in CONCEPTS if c.key != key])
    return ConceptSplit(key, forget, records("test", n_test), retain)
