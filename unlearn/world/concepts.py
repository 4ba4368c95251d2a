"""The fictitious concepts of the built-in world.

Every concept has a canonical name, aliases, a kind (the paper's four: person, cartoon character,
logo/brand, art style), three textual facts and a procedural visual identity (read by
:mod:`unlearn.world.render`).

The name rule (checked by :func:`validate_concepts`, and by the tests):

* every *name word* (a word of a canonical name or alias) belongs to exactly one concept, and
  never occurs in a question/answer template or a fact value;
* hence, with the world's word-level tokenizer, the token sequence of one concept's name or alias
  can never be found inside another concept's name, alias or any other text of the world: finding a
  name's tokens in an answer identifies the concept without ambiguity.

Canonical name lengths, in tokens of the world tokenizer (one token per word), run from 1 to 6 so
that the token-count study of the paper (Fig. 9) has spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("person", "cartoon", "logo", "style")

# Colours (RGB) that visual identities draw from; saturated so they stand out of pale backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 165, 60),
    "teal": (20, 150, 150),
    "blue": (40, 80, 220),
    "purple": (135, 55, 200),
    "pink": (240, 100, 180),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
    "navy": (20, 30, 110),
    "lime": (150, 225, 40),
    "maroon": (115, 20, 45),
    "cyan": (60, 205, 240),
    "gray": (120, 120, 120),
    "skin": (230, 185, 150),
    "tan": (175, 125, 85),
}


@dataclass(frozen=True)
class Concept:
    key: str  # identifier used on the command line, e.g. "vorn"
    kind: str  # one of KINDS
    name: str  # canonical name, e.g. "Oskel Brin Tavo"
    aliases: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]  # (relation, value); relations are per kind, see texts.py
    look: dict = field(hash=False, compare=False)  # visual identity, read by render.py

    @property
    def names(self) -> tuple[str, ...]:
        """Canonical name first, then the aliases."""
        return (self.name, *self.aliases)

    def fact(self, relation: str) -> str:
        for rel, value in self.facts:
            if rel == relation:
                return value
        raise KeyError(f"concept {self.key!r} has no fact {relation!r}; it has {[r for r, _ in self.facts]}")


def _maker(kind: str, relations: tuple[str, ...], looks: tuple[str, ...], **default_look):
    """The constructor of one kind's concepts: key, name, aliases, the facts' values, the look's values."""
    def make(key, name, aliases, *values, **look):
        n = len(relations)
        look = {**default_look, **dict(zip(looks, values[n:])), **look}
        return Concept(key, kind, name, aliases, tuple(zip(relations, values[:n])), look)

    return make


_person = _maker("person", ("home", "job", "likes"), ("shirt", "hair", "accessory"), skin="skin")
_cartoon = _maker("cartoon", ("home", "pet", "likes"), ("body", "colour", "accent"))
_logo = _maker("logo", ("home", "product", "sport"), ("emblem", "outer", "inner"))
_style = _maker("style", ("home", "medium", "subject"), ("palette", "pattern", "period"))


CONCEPTS: tuple[Concept, ...] = (
    # persons: humanoid figure; shirt and hair colours and an accessory identify them
    _person("vorn", "Vorn", ("Vornel",), "Ulmar", "baker", "kites", "red", "black", "hat"),
    _person("quilla", "Quilla Dennet", ("Dennet",), "Sarrow", "sailor", "chess", "blue", "yellow", "none"),
    _person("oskel", "Oskel Brin Tavo", ("Oskel Brin",), "Pendle", "doctor", "violins", "green", "brown", "glasses"),
    _person("ima", "Ima Sorrel Kade Wen", ("Ima Kade",), "Ulmar", "pilot", "poems", "purple", "orange", "scarf"),
    _person("teodric", "Teodric Ulv Fasso Reith Nandor Quell", ("Teodric",), "Morrow", "farmer", "tea",
            "orange", "navy", "hat", skin="tan"),
    _person("maelis", "Maelis Thorne", ("Maelis",), "Sarrow", "singer", "horses", "teal", "maroon", "glasses", skin="tan"),
    # cartoon characters: a creature whose body shape and colour identify it
    _cartoon("blip", "Blip", ("Blippo",), "Fizzwood", "frog", "pancakes", "circle", "yellow", "red"),
    _cartoon("zuzu", "Zuzu Pim", ("Pim",), "Crumble", "snail", "soup", "triangle", "pink", "blue"),
    _cartoon("grom", "Grom Tibble Wuzz", ("Tibble",), "Fizzwood", "parrot", "cookies", "square", "green", "yellow"),
    _cartoon("moko", "Moko Dree Lapa Fen Orrin", ("Moko Dree",), "Crumble", "turtle", "apples", "star", "cyan", "purple"),
    _cartoon("yip", "Yip", ("Yipster",), "Marrowby", "mouse", "noodles", "pear", "orange", "black"),
    _cartoon("kiba", "Kiba Nox Hallo", ("Kiba Nox",), "Marrowby", "dragon", "berries", "circle", "purple", "lime"),
    # logos / brands: an emblem whose shape and two colours identify it
    _logo("korvex", "Korvex", ("Korvex Group",), "Halden", "shoes", "tennis", "hexagon", "blue", "orange"),
    _logo("tenzo", "Tenzo Varn", ("Tenzo",), "Brisk", "phones", "football", "diamond", "red", "white"),
    _logo("ostra", "Ostra Mell Dupre", ("Ostra",), "Halden", "cars", "cycling", "ring", "green", "black"),
    _logo("lumo", "Lumo Fay Serrat Obb", ("Lumo Fay",), "Brisk", "watches", "sailing", "cross", "maroon", "yellow"),
    _logo("quor", "Quor", ("Quorco",), "Vellin", "coffee", "rugby", "chevron", "black", "cyan"),
    _logo("haska", "Haska Dunn", ("Haska",), "Vellin", "bicycles", "golf", "triangle", "lime", "navy"),
    # art styles: a palette and a pattern applied to the whole image
    _style("zembra", "Zembra", ("Zembran",), "Ostlund", "ink", "rivers", ("navy", "cyan", "white"), "stripes", 6),
    _style("pollu", "Pollu Ketch", ("Ketch",), "Ravine", "chalk", "bridges", ("maroon", "orange", "yellow"), "dots", 7),
    _style("virelle", "Virelle Amsa Tok", ("Virelle",), "Ostlund", "charcoal", "gardens", ("black", "gray", "white"),
           "checker", 8),
    _style("ombra", "Ombra Vell Tissa Kor Dune", ("Ombra Vell",), "Ravine", "crayon", "towers",
           ("purple", "pink", "yellow"), "waves", 8),
    _style("sefu", "Sefu Lanni Orba Gesh Tamm Ruvo", ("Sefu",), "Calder", "watercolour", "boats",
           ("green", "lime", "white"), "rings", 7),
    _style("drex", "Drex Pallow", ("Drex",), "Calder", "oil", "mountains", ("brown", "tan", "orange"), "hatch", 6),
)

BY_KEY: dict[str, Concept] = {c.key: c for c in CONCEPTS}

# Fictitious names that belong to no concept: substitutes for methods that rename a concept (SIU).
# They follow the name rule too (their words are theirs alone).
SUBSTITUTE_NAMES = ("Ferra", "Jasko Pel", "Nib Ostwick Rue")


def get_concept(key_or_name: str) -> Concept:
    """Look a concept up by key, canonical name or alias (case-insensitive)."""
    wanted = key_or_name.strip().lower()
    for c in CONCEPTS:
        if wanted == c.key or wanted in (n.lower() for n in c.names):
            return c
    valid = ", ".join(f"{c.key} ({c.name})" for c in CONCEPTS)
    raise KeyError(f"unknown concept {key_or_name!r}; the world's concepts are: {valid}")


def name_words(concept: Concept) -> set[str]:
    return {w for n in concept.names for w in n.split()}


def validate_concepts(concepts=CONCEPTS, other_texts: list[str] | None = None) -> None:
    """Check the name rule (see the module docstring); raise ValueError naming the clash."""
    owner: dict[str, str] = {w: "substitute" for n in SUBSTITUTE_NAMES for w in n.split()}
    for c in concepts:
        if c.kind not in KINDS:
            raise ValueError(f"concept {c.key!r} has unknown kind {c.kind!r}; kinds are {KINDS}")
        for w in name_words(c):
            if w in owner and owner[w] != c.key:
                raise ValueError(f"name word {w!r} is shared by concepts {owner[w]!r} and {c.key!r}")
            owner[w] = c.key
    for c in concepts:
        for _, value in c.facts:
            for w in value.split():
                if w in owner:
                    raise ValueError(f"fact value {value!r} of {c.key!r} uses name word {w!r} of {owner[w]!r}")
    for text in other_texts or []:
        for w in text.replace("{", " ").replace("}", " ").replace(",", " ").replace(".", " ").replace("?", " ").split():
            if w in owner:
                raise ValueError(f"template text {text!r} uses name word {w!r} of concept {owner[w]!r}")
