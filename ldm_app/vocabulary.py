"""The words a model saw in training, stored with it, and the prompt words it never saw.

A model trained here knows only the words of its captions: "a corgi in a sushi house" on the bundled shapes model
gives an orange blob, and without a word the user cannot tell why. train_ldm.py therefore writes `vocabulary.json`
at the root of the pipeline folder it saves (`{"words": [sorted...], "num_captions": N}`), the export carries it,
and generate.py and the pipeline say, in one line, which prompt words are not in it:

    words unknown to this model: corgi, sushi, house

A folder without the file (one saved by diffusers, an SD checkpoint) says nothing: its vocabulary is not known.

The bundled model's file comes from its real training captions, regenerated with the data stage of
recipes/shapes.sh (deterministic for its seed) and read back with this module:

    python -m ldm_app.data.shapes --out /tmp/shapes_vocab --num_images 30000 --resolution 64 --seed 0 \
        --two_object_fraction 0.5
    python -m ldm_app.vocabulary --captions /tmp/shapes_vocab/metadata.jsonl --out ldm_app/assets/default_model

One definition of a word, used for the captions and the prompts alike (`words`): the text lowercased, split into
runs of letters and digits; anything else (spaces, punctuation, A1111 weight brackets) separates words. It is
coarser than CLIP's BPE on purpose: the question is "did training ever show this word", not which tokens it makes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ldm_app.errors import UserError
from ldm_app.fileio import atomic_write_text

VOCABULARY_FILE = "vocabulary.json"
_WORD = re.compile(r"[^\W_]+")  # a run of letters and digits (Unicode): \w without the underscore


def words(text: str) -> list[str]:
    """The words of `text`, in order, lowercased: 'A red, RED circle!' -> ['a', 'red', 'red', 'circle']."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Vocabulary:
    """The set of words of a model's training captions, and how many captions they came from."""

    words: frozenset[str]
    num_captions: int = 0

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> Vocabulary:
        seen: set[str] = set()
        n = 0
        for caption in captions:
            seen.update(words(caption or ""))
            n += 1
        return cls(frozenset(seen), n)

    def __contains__(self, word: str) -> bool:
        return word in self.words

    def __len__(self) -> int:
        return len(self.words)

    def merged(self, other: Vocabulary) -> Vocabulary:
        """Both vocabularies (a fine-tuned model knows its base's words and its new captions')."""
        return Vocabulary(self.words | other.words, self.num_captions + other.num_captions)

    def with_words(self, extra: Iterable[str]) -> Vocabulary:
        """Also knowing the words of `extra` texts (e.g. tokens a textual-inversion embedding added)."""
        added = {w for text in extra for w in words(text)}
        return self if added <= self.words else Vocabulary(self.words | added, self.num_captions)

    def write(self, folder: str | os.PathLike) -> Path:
        """`folder`/vocabulary.json, written atomically."""
        path = Path(folder) / VOCABULARY_FILE
        data = {"words": sorted(self.words), "num_captions": self.num_captions}
        atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Vocabulary | None:
        """The vocabulary stored in `folder`, or None when the folder has no vocabulary.json (nothing is known)."""
        path = Path(folder) / VOCABULARY_FILE
        if not path.is_file():
            return None
        expected = 'expected {"words": [...], "num_captions": N}'
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); {expected}") from None
        if (not isinstance(data, dict) or not isinstance(data.get("words"), list)
                or not all(isinstance(w, str) for w in data["words"])
                or isinstance(data.get("num_captions"), bool) or not isinstance(data.get("num_captions"), int)):
            raise UserError(f"{path} is not a vocabulary file; {expected}")  # fmt: skip
        return cls(frozenset(data["words"]), data["num_captions"])


def unknown_words(prompt: str | Iterable[str], vocab: Vocabulary) -> list[str]:
    """The words of `prompt` (one text or several) not in `vocab`, each once, in order of first appearance."""
    texts = [prompt] if isinstance(prompt, str) else prompt
    found = dict.fromkeys(w for text in texts for w in words(text or "") if w not in vocab)
    return list(found)


def unknown_words_note(vocab: Vocabulary | None, prompts: str | Iterable[str],
                       negative_prompts: str | Iterable[str] = ()) -> str | None:  # fmt: skip
    """The one line that names the words of the prompts (then, apart, of the negative prompts) that `vocab` does not
    know; None when there are none or the vocabulary is unknown."""
    if vocab is None:
        return None
    unknown = unknown_words(prompts, vocab)
    negative = [w for w in unknown_words(negative_prompts, vocab) if w not in unknown]
    if not unknown and not negative:
        return None
    if not negative:
        return f"words unknown to this model: {', '.join(unknown)}"
    if not unknown:
        return f"words unknown to this model in the negative prompt: {', '.join(negative)}"
    return f"words unknown to this model: {', '.join(unknown)}; in the negative prompt: {', '.join(negative)}"


def main(argv: list[str] | None = None) -> None:
    """`python -m ldm_app.vocabulary --captions metadata.jsonl --out MODEL_DIR`: vocabulary.json from the caption
    column of a training metadata.jsonl (how the bundled model's file was made)."""
    from ldm_app.errors import ArgumentParser

    p = ArgumentParser(prog="python -m ldm_app.vocabulary", description=main.__doc__.splitlines()[0])
    p.add_argument("--captions", required=True, metavar="METADATA_JSONL", help="a metadata.jsonl of training data")
    p.add_argument("--caption_column", default="text", help="the caption column (default: text)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="the model folder to write vocabulary.json into")
    args = p.parse_args(argv)
    captions = []
    try:
        with open(args.captions, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get(args.caption_column), str):
                        raise UserError(f"{args.captions}:{number}: no text column {args.caption_column!r}")
                    captions.append(row[args.caption_column])
    except OSError as e:
        raise UserError(f"cannot read {args.captions}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{args.captions} is not JSON lines ({e})") from None
    if not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is not a folder; expected a model folder")
    vocab = Vocabulary.from_captions(captions)
    path = vocab.write(args.out)
    print(f"wrote {path}: {len(vocab)} words from {vocab.num_captions} captions")


if __name__ == "__main__":
    import sys

    from ldm_app.errors import run_cli

    sys.exit(run_cli(main))
