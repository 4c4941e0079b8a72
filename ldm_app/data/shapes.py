"""Synthetic captioned shapes: a tiny text-to-image dataset whose captions can be checked from the pixels.

    python -m ldm_app.data.shapes --out data/shapes --num_images 2000 --resolution 64 --seed 0

writes `DIR/000000.png ...` and `DIR/metadata.jsonl` (`{"file_name": ..., "text": ...}` a line), the layout that
`datasets.load_dataset("imagefolder", data_dir=DIR)` reads, plus `DIR/shapes_manifest.json`: the generator's
arguments and every file it wrote with its size and SHA-256 (imagefolder ignores it). The output is byte-identical
for a given seed.

`--out` may be a missing path, an empty folder, or a folder that is exactly an earlier output of this generator:
a valid manifest and nothing else (no file it does not list, no listed file changed since). That folder is
replaced atomically (built in a temporary folder next to it, then renamed into place); anything else is refused
with a one-line error before any image is drawn, so a folder holding files the generator did not write (a real
dataset, a dataset written before manifests existed, a user's notes) is never deleted. A full disk or read-only
place while writing is a one-line error too; the temporary folder is removed and `--out` is left as it was.

Captions are canonical ("a small red circle on the left on a white background", "a small red circle above a small
blue square on a gray background"). `--free_caption_fraction F` (default 0) captions a share F of the images
free-form instead (`free_caption`): attributes left out ("a red circle", "something blue on the left"), phrases in
any order ("on a black background, a big red circle at the top"), words from the SYNONYMS table; `parse_caption`
reads both forms back. A fraction rather than a switch between two styles because the model to train wants both:
free captions for partial prompts, canonical ones so that a fully stated prompt stays as well learnt. Which images
get a free caption, and its wording, come from a random stream of their own: the scenes and images are the same
at every F, and at F = 0 the output is byte-identical to the generator's before this option existed.

The vocabulary below is FIXED: evaluation imports it to parse captions and to check generated images, so
changing a name, colour or range invalidates every trained model's scores. Geometry is kept in fractions of the
image side so that a caption means the same thing at every resolution.
"""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ldm_app.errors import ArgumentParser, UserError, run_cli
from ldm_app.data.generated import GeneratedFolder, add_common_arguments, check_counts

# ---- vocabulary (imported by evaluation: keep fixed) ----
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # square axis-aligned, triangle pointing up
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
# Opt-in colours OUTSIDE the fixed vocabulary (`--extra_colours`), for fine-tuning and measuring a concept the
# bundled model has never seen. They are not in COLOURS, so the judge, the class labels and every default render
# are unchanged; a scene draws from them only when asked. "pink" is a single CLIP token, and its palette entry is
# >= 113 RGB units from every COLOURS entry (nearest: purple) and every background. "vermilion" lies half-way
# between red and orange (46 units from each): a colour the bundled model never drew, but one its autoencoder lets
# through (0.85-0.89 of renders come back nearer to it than to any old colour; pink: none) and one the jitter keeps apart
# (no jittered red or orange is nearer to it, nor the reverse: tests/test_new_concept.py).
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (240, 110, 200),
    "vermilion": (230, 85, 35),
}
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **EXTRA_COLOURS}  # every drawable colour
# Likewise opt-in shapes (`--extra_shapes`): "cross" is an upright plus sign whose arms are a third of its box wide.
EXTRA_SHAPES: tuple[str, ...] = ("cross",)
COLOUR_JITTER = 15  # each channel of an object's colour is its palette entry +- at most this
# Object width (= height of its bounding box) as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.30), "large": (0.45, 0.60)}
# Likewise an opt-in size (`--extra_sizes`): "medium" lies in the gap between small and large, 0.05 of the side
# (3 px at 64) from each; its range is centred on the 0.375 split of the geometric judge (evaluation/geometry.py).
EXTRA_SIZES: dict[str, tuple[float, float]] = {"medium": (0.35, 0.40)}
ALL_SIZES: dict[str, tuple[float, float]] = {**SIZES, **EXTRA_SIZES}  # every drawable size
# Where the object's bounding-box centre lies: a third of the image (the other coordinate at the middle), or the
# centre. Values are the words used in captions.
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# "A {relation} B": the first object's centre is {relation} the second's.
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
# Two-object scenes: where (first, second) go for each relation; both objects are small and of different colours.
RELATION_POSITIONS: dict[str, tuple[str, str]] = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
}

# ---- free-form captions (opt-in: --free_caption_fraction) ----
# Other plain-English words for the FIXED vocabulary above, in one table: a free-form caption may use any entry,
# the canonical one included (listed first). Left out on purpose: "box" (a 3-D container), "dot" (says small),
# "over" / "under" (also mean covering / hidden beneath), "violet" (not the same hue as everyone's "purple").
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "size": {"small": ("small", "little"), "large": ("large", "big")},
    "colour": {c: (c,) for c in COLOURS},
    "shape": {s: (s,) for s in SHAPES},
    "background": {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")},
    "position": {
        "left": ("on the left", "at the left", "on the left side"),
        "right": ("on the right", "at the right", "on the right side"),
        "top": ("at the top", "near the top"),
        "bottom": ("at the bottom", "near the bottom"),
        "center": ("in the center", "in the centre", "in the middle"),
    },
    "relation": {
        "above": ("above",),
        "below": ("below", "beneath"),
        "to the left of": ("to the left of", "left of"),
        "to the right of": ("to the right of", "right of"),
    },
}
# "A {relation} B" said the other way round: "B {inverse} A" describes the same scene.
INVERSE_RELATIONS: dict[str, str] = {
    "above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of",
}
BACKGROUND_PREPOSITIONS = ("on", "against")  # "{prep} a gray background"; not "with" ("a red circle left of a blue
# square with a gray background" could give the square the background)
OBJECT_NOUNS = ("shape", "object")  # stand for the shape when it is left out: "a red shape"
# How often a free caption states each one-object attribute. Colour and shape: at least one of them is always
# stated (a caption naming neither, "something at the top", says too little to learn or judge an object from).
FREE_STATE_PROBABILITY = {"size": 0.5, "position": 0.6, "background": 0.5}
FREE_OBJECT_NAMING = {"colour and shape": 0.6, "colour": 0.2, "shape": 0.2}
FREE_TWO_OBJECT_SIZE_PROBABILITY = 0.3  # "small" per object (both objects of a two-object scene are small)
# Seed stream of the caption wording: image i's caption rng is default_rng([seed, FREE_CAPTION_STREAM, i]), apart
# from the scene's default_rng([seed, i]), so scenes and images are the same in every caption style.
FREE_CAPTION_STREAM = 1019

SUPERSAMPLE = 4  # draw at 4x then box-downsample: anti-aliased edges without ringing (LANCZOS overshoots)
_THIRD_MARGIN = 0.01  # keep an object's centre this far inside its third, so the position is never borderline
_CENTER_JITTER = 0.08  # "in the center" objects: centre within +-8% of the middle (well inside the middle third)


@dataclass(frozen=True)
class ShapeObject:
    shape: str  # one of SHAPES (or of EXTRA_SHAPES when asked for)
    colour: str  # one of COLOURS (or of EXTRA_COLOURS when asked for)
    rgb: tuple[int, int, int]  # the jittered colour actually drawn
    size: str  # one of SIZES (or of EXTRA_SIZES when asked for)
    width: float  # bounding-box side / image side
    center: tuple[float, float]  # bounding-box centre (x, y) / image side; y grows downwards
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str  # one of BACKGROUNDS
    objects: tuple[ShapeObject, ...]  # one object, or two for a relation scene
    relation: str | None = None  # one of RELATIONS for two-object scenes

    @property
    def caption(self) -> str:
        return caption(self)


def _describe(obj: ShapeObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    """The scene's caption, exactly as written in metadata.jsonl."""
    tail = f"on a {scene.background} background"
    if scene.relation is None:
        (obj,) = scene.objects
        return f"{_describe(obj)} {POSITIONS[obj.position]} {tail}"
    first, second = scene.objects
    return f"{_describe(first)} {scene.relation} {_describe(second)} {tail}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _choice(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def _free_object(rng: np.random.Generator, stated: dict[str, str]) -> str:
    """An object phrase naming exactly the attributes in `stated` (size, colour, shape; colour or shape given)."""
    words = [_choice(rng, SYNONYMS[a][stated[a]]) for a in ("size", "colour") if a in stated]
    if "shape" not in stated and "size" not in stated and rng.random() < 0.5:
        return f"something {words[0]}"  # "something blue"
    words.append(_choice(rng, SYNONYMS["shape"][stated["shape"]]) if "shape" in stated else _choice(rng, OBJECT_NOUNS))
    return f"{_article(words[0])} {' '.join(words)}"


def _background_phrase(rng: np.random.Generator, background: str) -> str:
    return f"{_choice(rng, BACKGROUND_PREPOSITIONS)} a {_choice(rng, SYNONYMS['background'][background])} background"


def _arrange(rng: np.random.Generator, core: str, phrases: list[str]) -> str:
    """`core` and `phrases` in a random order: the ones before the core end with a comma ("at the top, on a black
    background, a red circle"), the ones after follow it ("a red circle at the top on a black background")."""
    order = [core, *phrases]
    rng.shuffle(order)
    k = order.index(core)
    return ", ".join(order[: k + 1]) + "".join(f" {p}" for p in order[k + 1 :])


def free_caption(scene: Scene, rng: np.random.Generator) -> tuple[str, dict]:
    """A free-form caption of `scene` drawn with `rng`, and what it states (the form `parse_caption` returns).

    One object: any of size, position and background may be left out, and colour or shape (not both); the
    phrases come in any order and words from SYNONYMS. Two objects: each named by colour and shape (size
    "small" sometimes), the relation in any wording of SYNONYMS or said the other way round ("B below A"), the
    background sometimes, before or after. What is left out means "any": the scene is the same."""
    stated: dict = {}
    if scene.relation is None:
        (obj,) = scene.objects
        naming = str(rng.choice(list(FREE_OBJECT_NAMING), p=list(FREE_OBJECT_NAMING.values())))
        for attribute in ("colour", "shape"):
            if attribute in naming:
                stated[attribute] = getattr(obj, attribute)
        for attribute, p in FREE_STATE_PROBABILITY.items():
            if rng.random() < p:
                stated[attribute] = scene.background if attribute == "background" else getattr(obj, attribute)
        phrases = []
        if "position" in stated:
            phrases.append(_choice(rng, SYNONYMS["position"][stated["position"]]))
        if "background" in stated:
            phrases.append(_background_phrase(rng, scene.background))
        return _arrange(rng, _free_object(rng, stated), phrases), stated
    first, second, relation = *scene.objects, scene.relation
    if rng.random() < 0.5:  # said the other way round
        first, second, relation = second, first, INVERSE_RELATIONS[relation]
    objects = []
    for obj in (first, second):
        named = {"colour": obj.colour, "shape": obj.shape}
        if rng.random() < FREE_TWO_OBJECT_SIZE_PROBABILITY:
            named["size"] = obj.size
        objects.append(named)
    stated["relation"], stated["objects"] = relation, tuple(objects)
    words = _choice(rng, SYNONYMS["relation"][relation])
    core = f"{_free_object(rng, objects[0])} {words} {_free_object(rng, objects[1])}"
    phrases = []
    if rng.random() < FREE_STATE_PROBABILITY["background"]:
        stated["background"] = scene.background
        phrases.append(_background_phrase(rng, scene.background))
    return _arrange(rng, core, phrases), stated


def _words(kind: str) -> dict[str, str]:
    """Every wording of the `kind` in SYNONYMS -> its vocabulary name."""
    return {word: name for name, words in SYNONYMS[kind].items() for word in words}


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: "left of" last


def parse_caption(text: str) -> dict:
    """What a caption of this generator (canonical or free-form) states, in vocabulary names:
    one object: a subset of {"colour", "shape", "size", "position", "background"} with their values;
    two objects: {"relation": one of RELATIONS, "objects": (first, second) as written, each a dict of the stated
    "colour" / "shape" / "size"}, plus "background" if stated. Raises ValueError for text outside this grammar."""
    text = " ".join(text.lower().split())
    stated: dict = {}
    background = re.compile(rf"\b(?:{'|'.join(BACKGROUND_PREPOSITIONS)}) an? ({_alternation(_words('background'))}) "
                            r"background\b")
    found = _at_most_one(background, "background", text)
    if found:
        stated["background"] = _words("background")[found]
        text = background.sub(",", text)
    relation = re.compile(rf"\b({_alternation(_words('relation'))})\b")
    found = _at_most_one(relation, "relation", text)
    if found:
        left, right = (part.strip(" ,") for part in relation.split(text) if part != found)
        stated["relation"] = _words("relation")[found]
        stated["objects"] = (_parse_object(left, text), _parse_object(right, text))
        return stated
    position = re.compile(rf"\b({_alternation(_words('position'))})\b")
    found = _at_most_one(position, "position", text)
    if found:
        stated["position"] = _words("position")[found]
        text = position.sub(",", text)
    chunks = [c.strip() for c in text.split(",") if c.strip()]
    if len(chunks) != 1:
        raise ValueError(f"expected one object phrase, found {chunks} in {text!r}")
    return {**_parse_object(chunks[0], text), **stated}


def _at_most_one(pattern: re.Pattern, what: str, text: str) -> str | None:
    """The one phrase of `pattern` in `text` (its captured group), None if absent; ValueError if several."""
    found = pattern.findall(text)
    if len(found) > 1:
        raise ValueError(f"more than one {what} in {text!r}")
    return found[0] if found else None


def _parse_object(phrase: str, text: str) -> dict[str, str]:
    """"a small red circle", "a red shape", "an orange object", "a circle", "something blue" -> what it states."""
    size, colour, shape = (_alternation(_words(k)) for k in ("size", "colour", "shape"))
    m = re.fullmatch(rf"(?:an? (?:({size}) )?(?:({colour}) )?(?:({shape})|{'|'.join(OBJECT_NOUNS)})"
                     rf"|something ({colour}))", phrase)
    if m is None or not (m[2] or m[3] or m[4]):  # "a small object" names neither colour nor shape
        raise ValueError(f"cannot read an object from {phrase!r} in {text!r}")
    found = {"size": m[1], "colour": m[2] or m[4], "shape": m[3]}
    return {k: _words(k)[v] for k, v in found.items() if v}


def _sample_center(rng: np.random.Generator, position: str, width: float, inset: float) -> tuple[float, float]:
    """Centre (x, y) for `position`: the free coordinate anywhere in its third such that the object (side `width`)
    stays `inset` inside the image; the other coordinate at the middle."""
    if position == "center":
        x, y = rng.uniform(0.5 - _CENTER_JITTER, 0.5 + _CENTER_JITTER, size=2)
        return float(x), float(y)
    lo, hi = width / 2 + inset, 1 / 3 - _THIRD_MARGIN  # range for a centre in the left/top third
    c = float(rng.uniform(lo, hi))
    if position in ("right", "bottom"):
        c = 1.0 - c
    return (c, 0.5) if position in ("left", "right") else (0.5, c)


def _sample_object(
    rng: np.random.Generator, size: str, position: str, colour: str, inset: float,
    shapes: tuple[str, ...] = SHAPES, shape_weights: np.ndarray | None = None,
) -> ShapeObject:
    lo, hi = ALL_SIZES[size]
    if position != "center":
        # A large object must fit between the image edge and the end of its third.
        hi = min(hi, 2 * (1 / 3 - _THIRD_MARGIN - inset))
    width = float(rng.uniform(lo, hi))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
    return ShapeObject(
        shape=str(rng.choice(shapes, p=shape_weights)),
        colour=colour,
        rgb=rgb,
        size=size,
        width=width,
        center=_sample_center(rng, position, width, inset),
        position=position,
    )


def _widened(old, extras: tuple[str, ...], fraction: float | None) -> tuple[list[str], np.ndarray | None]:
    """The fixed names `old` and the `extras` not among them, and the probabilities to draw them with (`p=` of
    rng.choice): None (uniform, the same draws as without `p`) unless `fraction` is given, in which case the extra
    names share that probability equally and the fixed ones share the rest."""
    names = list(old) + [n for n in extras if n not in old]
    n_old, n_new = len(old), len(names) - len(old)
    if fraction is None or not n_new:
        return names, None
    return names, np.array([(1 - fraction) / n_old] * n_old + [fraction / n_new] * n_new)


def sample_scene(
    rng: np.random.Generator, resolution: int, two_object_fraction: float = 0.25,
    extra_colours: tuple[str, ...] = (), extra_colour_fraction: float | None = None,
    extra_shapes: tuple[str, ...] = (), extra_shape_fraction: float | None = None,
    extra_sizes: tuple[str, ...] = (), extra_size_fraction: float | None = None,
) -> Scene:
    """Draw a random scene. `resolution` sets the inset (at least one pixel) that keeps objects inside the image.

    `extra_colours` (names from EXTRA_COLOURS) widen the palette, uniformly or with `extra_colour_fraction` the
    probability of an extra colour per draw; `extra_shapes` / `extra_shape_fraction` likewise the shapes, and
    `extra_sizes` / `extra_size_fraction` the one-object sizes (both objects of a two-object scene stay small).
    Without them the draws (and so every scene) are exactly the default's."""
    inset = max(0.01, 1.0 / resolution)
    palette, weights = _widened(COLOURS, extra_colours, extra_colour_fraction)
    shapes, shape_weights = _widened(SHAPES, extra_shapes, extra_shape_fraction)
    kw = {"shapes": tuple(shapes), "shape_weights": shape_weights}
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < two_object_fraction:
        relation = str(rng.choice(RELATIONS))
        colours = rng.choice(palette, size=2, replace=False, p=weights)
        # Opposite thirds on one axis, both centred on the other: with widths <= 0.30 they are >= 0.03 apart.
        objects = tuple(
            _sample_object(rng, "small", pos, str(col), inset, **kw)
            for pos, col in zip(RELATION_POSITIONS[relation], colours)
        )
        return Scene(background=background, objects=objects, relation=relation)
    sizes, size_weights = _widened(SIZES, extra_sizes, extra_size_fraction)
    size = str(rng.choice(sizes, p=size_weights))
    position = str(rng.choice(list(POSITIONS)))
    colour = str(rng.choice(palette, p=weights))
    obj = _sample_object(rng, size, position, colour, inset, **kw)
    return Scene(background=background, objects=(obj,))


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    """Draw `obj` on a canvas `side` pixels wide; coordinates are rounded to the (supersampled) pixel grid."""
    half = obj.width / 2
    x0, x1 = round((obj.center[0] - half) * side), round((obj.center[0] + half) * side)
    y0, y1 = round((obj.center[1] - half) * side), round((obj.center[1] + half) * side)
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=obj.rgb)  # PIL boxes include their last pixel
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=obj.rgb)
    elif obj.shape == "cross":  # opt-in (EXTRA_SHAPES): arms a third of the box wide
        a, b = x0 + round((x1 - x0) / 3), x1 - round((x1 - x0) / 3)
        c, d = y0 + round((y1 - y0) / 3), y1 - round((y1 - y0) / 3)
        draw.rectangle((a, y0, b - 1, y1 - 1), fill=obj.rgb)
        draw.rectangle((x0, c, x1 - 1, d - 1), fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, resolution: int) -> Image.Image:
    """Render `scene` as an anti-aliased RGB image of `resolution` x `resolution` pixels."""
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


METADATA_FILE = "metadata.jsonl"
MANIFEST_FILE = "shapes_manifest.json"  # what the generator wrote: see the module docstring
WRITTEN_BY = "python -m ldm_app.data.shapes"
OUTPUT = GeneratedFolder(MANIFEST_FILE, WRITTEN_BY, "DIR/shapes")  # --out's rules and the atomic write
check_previous_output = OUTPUT.check_previous_output  # is FOLDER exactly an earlier output of this generator?


def _check_args(out: Path, num_images: int, resolution: int, seed: int, two_object_fraction: float) -> None:
    check_counts(num_images, resolution, seed)
    if not 0.0 <= two_object_fraction <= 1.0:
        raise UserError(f"--two_object_fraction must be between 0 and 1, got {two_object_fraction}")
    OUTPUT.check_out(out)


def class_label(scene: Scene) -> int:
    """The class of a one-object scene for class-conditional training: colour x shape, colour-major
    (COLOURS order, then SHAPES order): 0 = red circle, 1 = red square, ..., 17 = orange triangle."""
    (obj,) = scene.objects
    return list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


NUM_CLASSES = len(COLOURS) * len(SHAPES)


def object_size(scene: Scene) -> float:
    """The object's width (bounding-box side / image side) of a one-object scene, to 3 decimals (a thousandth of
    the side is a sixteenth of a pixel at 64 px): the scalar of scalar-conditioned training."""
    (obj,) = scene.objects
    return round(obj.width, 3)



def _checked_extras(kind: str, names: tuple[str, ...] | list[str], known: dict | tuple,
                    fraction: float | None) -> tuple[str, ...]:
    """--extra_colours / --extra_shapes / --extra_sizes (each name known, in order, once each) and their
    --extra_*_fraction."""
    names = tuple(dict.fromkeys(names))
    for name in names:
        if name not in known:
            raise UserError(f"--extra_{kind}s: unknown {kind} {name!r}; choose from {', '.join(known)}")
    if fraction is not None:
        if not names:
            raise UserError(f"--extra_{kind}_fraction needs --extra_{kind}s")
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"--extra_{kind}_fraction must be between 0 and 1, got {fraction}")
    return names

def make_dataset(
    out: str | Path, num_images: int, resolution: int, seed: int, two_object_fraction: float = 0.25,
    labels: bool = False, sizes: bool = False, extra_colours: tuple[str, ...] | list[str] = (),
    extra_colour_fraction: float | None = None, extra_shapes: tuple[str, ...] | list[str] = (),
    extra_shape_fraction: float | None = None, extra_sizes: tuple[str, ...] | list[str] = (),
    extra_size_fraction: float | None = None, free_caption_fraction: float = 0.0,
) -> Path:
    """Write `num_images` rendered scenes and their captions to `out` (imagefolder layout), atomically; with
    `labels` (one-object scenes only), also each scene's `class_label` as the `label` of its metadata line; with
    `sizes` (one-object scenes only), its `object_size` as `size`.

    Image i is drawn from its own generator seeded with (seed, i), so it does not depend on `num_images`.
    `extra_colours`, `extra_shapes`, `extra_sizes` and their `extra_*_fraction`: see `sample_scene`
    (opt-in; without them the output is unchanged). `free_caption_fraction`: the share of images whose caption is
    a `free_caption` instead of the canonical one (whether image i gets one, and its wording, are drawn from the
    separate stream [seed, FREE_CAPTION_STREAM, i], so the images, and every caption at 0, are the default's).
    """
    if labels and two_object_fraction:
        raise UserError("class labels are colour x shape of one object: use --two_object_fraction 0 with --labels")
    if sizes and two_object_fraction:
        raise UserError("sizes are the width of one object: use --two_object_fraction 0 with --sizes")
    extra_colours = _checked_extras("colour", extra_colours, EXTRA_COLOURS, extra_colour_fraction)
    extra_shapes = _checked_extras("shape", extra_shapes, EXTRA_SHAPES, extra_shape_fraction)
    extra_sizes = _checked_extras("size", extra_sizes, EXTRA_SIZES, extra_size_fraction)
    if extra_colour_fraction == 1.0 and len(extra_colours) < 2 and two_object_fraction > 0:
        raise UserError("--extra_colour_fraction 1 draws only the extra colour, but a two-object scene needs two "
                        "different colours: give two --extra_colours, a fraction below 1, or --two_object_fraction 0")
    if (extra_colours or extra_shapes) and labels:
        raise UserError("class labels cover the fixed colours and shapes only: --labels cannot be used with "
                        "--extra_colours / --extra_shapes")
    if not 0.0 <= free_caption_fraction <= 1.0:
        raise UserError(f"--free_caption_fraction must be between 0 and 1, got {free_caption_fraction}")
    out = Path(out)
    _check_args(out, num_images, resolution, seed, two_object_fraction)
    arguments = {"num_images": int(num_images), "resolution": int(resolution), "seed": int(seed),
                 "two_object_fraction": float(two_object_fraction), "labels": bool(labels)}
    if sizes:  # recorded only when asked, so the manifests of earlier commands stay byte-identical
        arguments["sizes"] = True
    if extra_colours:  # likewise
        arguments["extra_colours"] = list(extra_colours)
        arguments["extra_colour_fraction"] = extra_colour_fraction
    if extra_shapes:
        arguments["extra_shapes"] = list(extra_shapes)
        arguments["extra_shape_fraction"] = extra_shape_fraction
    if extra_sizes:
        arguments["extra_sizes"] = list(extra_sizes)
        arguments["extra_size_fraction"] = extra_size_fraction
    if free_caption_fraction:
        arguments["free_caption_fraction"] = float(free_caption_fraction)
    with OUTPUT.writing(out, arguments) as writer:
        lines = []
        for i in tqdm(range(num_images), desc="rendering shapes", unit="img"):
            scene = sample_scene(np.random.default_rng([seed, i]), resolution, two_object_fraction,
                                 extra_colours, extra_colour_fraction, extra_shapes, extra_shape_fraction,
                                 extra_sizes, extra_size_fraction)
            file_name = f"{i:06d}.png"
            png = io.BytesIO()
            render_scene(scene, resolution).save(png, format="PNG")
            writer.write(file_name, png.getvalue())
            text = caption(scene)
            if free_caption_fraction:
                wording = np.random.default_rng([seed, FREE_CAPTION_STREAM, i])
                if wording.random() < free_caption_fraction:
                    text = free_caption(scene, wording)[0]
            row = {"file_name": file_name, "text": text}
            if labels:
                row["label"] = class_label(scene)
            if sizes:
                row["size"] = object_size(scene)
            lines.append(json.dumps(row) + "\n")
        writer.write(METADATA_FILE, "".join(lines).encode("utf-8"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m ldm_app.data.shapes",
        description="Write a synthetic captioned shapes dataset (imagefolder layout).",
    )
    add_common_arguments(parser)
    parser.add_argument("--two_object_fraction", type=float, default=0.25, help="share of two-object scenes")
    parser.add_argument("--labels", action="store_true", help="also write each image's class (colour x shape, "
                        f"{NUM_CLASSES} classes) as 'label' in metadata.jsonl; needs --two_object_fraction 0")
    parser.add_argument("--sizes", action="store_true", help="also write each image's object width (bounding-box "
                        "side / image side, 3 decimals) as 'size' in metadata.jsonl, the scalar of "
                        "conditioning.kind scalar / text+scalar; needs --two_object_fraction 0")
    parser.add_argument("--extra_colours", nargs="+", default=[], metavar="COLOUR",
                        help=f"also draw these colours outside the fixed vocabulary ({', '.join(EXTRA_COLOURS)}), "
                        "e.g. to fine-tune on a new concept; without it the output is unchanged")
    parser.add_argument("--extra_colour_fraction", type=float, default=None,
                        help="probability that a drawn colour is one of --extra_colours (default: uniform over "
                        "all colours)")
    parser.add_argument("--extra_shapes", nargs="+", default=[], metavar="SHAPE",
                        help=f"also draw these shapes outside the fixed vocabulary ({', '.join(EXTRA_SHAPES)}); "
                        "without it the output is unchanged")
    parser.add_argument("--extra_shape_fraction", type=float, default=None,
                        help="probability that a drawn shape is one of --extra_shapes (default: uniform)")
    parser.add_argument("--extra_sizes", nargs="+", default=[], metavar="SIZE",
                        help="also draw these one-object sizes outside the fixed vocabulary "
                        f"({', '.join(EXTRA_SIZES)}); without it the output is unchanged")
    parser.add_argument("--extra_size_fraction", type=float, default=None,
                        help="probability that a one-object scene's size is one of --extra_sizes (default: uniform)")
    parser.add_argument("--free_caption_fraction", type=float, default=0.0,
                        help="share of images captioned free-form (attributes left out, phrases in any order, "
                        "synonyms; the images are the same), e.g. 0.5; default 0: every caption canonical")
    args = parser.parse_args(argv)
    path = make_dataset(args.out, args.num_images, args.resolution, args.seed, args.two_object_fraction,
                        labels=args.labels, sizes=args.sizes, extra_colours=args.extra_colours,
                        extra_colour_fraction=args.extra_colour_fraction, extra_shapes=args.extra_shapes,
                        extra_shape_fraction=args.extra_shape_fraction, extra_sizes=args.extra_sizes,
                        extra_size_fraction=args.extra_size_fraction, free_caption_fraction=args.free_caption_fraction)
    print(f"wrote {args.num_images} images to {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
