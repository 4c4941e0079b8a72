"""Prune a model's CLIP tokenizer and text-encoder embedding table to the words it was trained on.

A text encoder trained here from scratch keeps CLIP's whole BPE vocabulary (49,408 tokens) although its captions
use a few dozen words: the bundled model's 29 words need 606 tokens. The rest costs on every cold start and in
the folder: transformers parses the 3.6 MiB tokenizer.json in Python (0.28 s of CPU per load on the project's
machine, the largest piece of `generate.py`'s start-up beyond the libraries' imports; the pruned one loads in
0.002 s) and the embedding table is 94% of the text encoder's weights (12.6 of 13.4 MB in fp16).

`python -m ldm_app.export --prune_vocabulary` keeps, of the BPE model:

- the 512 byte-level base symbols and the special tokens, so that every text still tokenizes;
- every merge whose result is a substring of a pre-tokenized word of the model's vocabulary.json (with the
  end-of-word marker only where the substring ends the word), and every merge whose result is made of ASCII
  punctuation only (so "," or "..." give the same tokens).

That keeps a superset of the merges BPE applies to those texts, in their original order (rank), and BPE picks the
lowest-ranked applicable merge at every step, so any text made of the vocabulary's words, digits, spaces and ASCII
punctuation gives the same tokens as before; their ids are renumbered in the original order and the embedding
rows gathered to match, so the text encoder's output is bit-identical (tested: the same image in our pipeline
and in diffusers'). A word the model never saw ("corgi") now falls apart into smaller pieces instead of an
untrained whole-word token: both are embeddings no caption ever trained, and generate.py names such words
(ldm_app.vocabulary). Textual-inversion embeddings still add their tokens on top.

Written by hand because neither tokenizers nor transformers prune a trained BPE model (tokenizers can only train
a new one); the check that the pruned tokenizer gives the same tokens for every vocabulary word runs on each
export.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .vocabulary import Vocabulary

EMBEDDING_KEY = "embeddings.token_embedding.weight"  # under text_model. in some transformers versions' files
END_OF_WORD = "</w>"
_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class PruneReport:
    tokens_before: int
    tokens_after: int
    merges_before: int
    merges_after: int


def _byte_decoder() -> dict[str, int]:
    """GPT-2/CLIP's byte-level alphabet back to bytes (the inverse of tokenizers' ByteLevel mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_punctuation(token: str, decoder: dict[str, int]) -> bool:
    symbols = token[: -len(END_OF_WORD)] if token.endswith(END_OF_WORD) else token
    try:
        text = bytes(decoder[c] for c in symbols).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return False
    return bool(text) and all(c in _PUNCTUATION for c in text)


def _word_pieces(backend, words) -> list[str]:
    """The byte-level pieces the tokenizer's own normalizer and pre-tokenizer make of `words`."""
    pieces = []
    for word in words:
        text = backend.normalizer.normalize_str(word) if backend.normalizer is not None else word
        pieces.extend(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return pieces


def _substrings(pieces: list[str]) -> set[str]:
    out = set()
    for p in pieces:
        for i in range(len(p)):
            for j in range(i + 1, len(p) + 1):
                out.add(p[i:j])
            out.add(p[i:] + END_OF_WORD)
    return out


def pruned_tokenizer_json(data: dict, vocab: Vocabulary) -> tuple[dict, list[int]]:
    """The pruned tokenizer.json (a new dict) and, for each new id, the old id it came from."""
    from tokenizers import Tokenizer

    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise UserError("the tokenizer is not CLIP's byte-level BPE (tokenizer.json model type "
                        f"{model.get('type')!r}); --prune_vocabulary handles CLIP tokenizers only")  # fmt: skip
    backend = Tokenizer.from_str(json.dumps(data))
    old_vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    wanted = _substrings(_word_pieces(backend, sorted(vocab.words)))
    decoder = _byte_decoder()
    kept_merges = [m for m in merges if (m[0] + m[1]) in wanted or _is_punctuation(m[0] + m[1], decoder)]
    base = {t for t in old_vocab if len(t[: -len(END_OF_WORD)] if t.endswith(END_OF_WORD) else t) == 1}
    specials = {a["content"] for a in data.get("added_tokens", [])}
    keep = base | specials | {a + b for a, b in kept_merges} | {x for m in kept_merges for x in m}
    missing = sorted(t for t in keep if t not in old_vocab and t not in specials)
    if missing:  # a merge whose parts or result the vocabulary lacks: not a consistent BPE model
        raise UserError(f"the tokenizer's merges name {missing[0]!r}, which its vocabulary lacks; cannot prune it")
    old_ids = sorted({old_vocab[t] for t in keep if t in old_vocab} | {a["id"] for a in data.get("added_tokens", [])})
    new_id = {old: new for new, old in enumerate(old_ids)}
    by_old = {i: t for t, i in old_vocab.items()}
    out = json.loads(json.dumps(data))  # a deep copy
    out["model"]["vocab"] = {by_old[o]: new_id[o] for o in old_ids if o in by_old}
    out["model"]["merges"] = [list(m) for m in kept_merges]
    for token in out.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    if out.get("padding"):
        out["padding"]["pad_id"] = new_id[out["padding"]["pad_id"]]
    post = out.get("post_processor") or {}
    for key in ("sep", "cls"):
        if isinstance(post.get(key), list):
            post[key][1] = new_id[post[key][1]]
    _check_same_tokens(backend, Tokenizer.from_str(json.dumps(out)), old_ids, sorted(vocab.words))
    return out, old_ids


def _check_same_tokens(before, after, old_ids: list[int], words: list[str]) -> None:
    """Every vocabulary word, alone and in one text with punctuation, must give the same tokens as before."""
    for tok in (before, after):
        tok.no_padding()
        tok.no_truncation()
    texts = words + [", ".join(words) + "...!"]
    for text in texts:
        old = before.encode(text).ids
        new = [old_ids[i] for i in after.encode(text).ids]
        if new != old:
            raise UserError(f"pruning changed the tokens of {text[:60]!r}; the tokenizer is not pruned")


def prune_folder(folder: str | Path, vocab: Vocabulary) -> PruneReport:
    """Prune the pipeline folder `folder` in place (its tokenizer/ and text_encoder/; meant for a folder being
    written, e.g. the export's temporary one): tokenizer.json, the embedding table and the text encoder's
    vocab_size and special-token ids."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tok_path = folder / "tokenizer" / "tokenizer.json"
    weights = folder / "text_encoder" / "model.safetensors"
    config_path = folder / "text_encoder" / "config.json"
    for path in (tok_path, weights, config_path):
        if not path.is_file():
            raise UserError(f"--prune_vocabulary needs {path.relative_to(folder)} in the model folder; it has none")
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    pruned, old_ids = pruned_tokenizer_json(data, vocab)
    state = load_file(str(weights))
    key = next((k for k in state if k == EMBEDDING_KEY or k.endswith("." + EMBEDDING_KEY)), EMBEDDING_KEY)
    table = state.get(key)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if table is None or table.shape[0] != config.get("vocab_size") or max(old_ids) >= table.shape[0]:
        raise UserError(f"{weights.relative_to(folder)} has no {EMBEDDING_KEY} of vocab_size rows; cannot prune it")
    state[key] = table[torch.tensor(old_ids)].contiguous()
    new_id = {old: new for new, old in enumerate(old_ids)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) in new_id:
            config[key] = new_id[config[key]]
    config["vocab_size"] = len(old_ids)
    save_file(state, str(weights), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok_path.write_text(json.dumps(pruned, ensure_ascii=False) + "\n", encoding="utf-8")
    return PruneReport(len(data["model"]["vocab"]) + len(data.get("added_tokens", [])) - _overlap(data),
                       len(old_ids), len(data["model"]["merges"]), len(pruned["model"]["merges"]))  # fmt: skip


def _overlap(data: dict) -> int:
    """Added tokens that are also in the BPE vocabulary (counted once)."""
    vocab = data["model"]["vocab"]
    return sum(1 for a in data.get("added_tokens", []) if a["content"] in vocab)
