"""LoRA weights, textual-inversion embeddings and A1111-style prompt weighting for a Stable-Diffusion-1.x pipeline.

Everything here works on any `diffusers.StableDiffusionPipeline` (and so on subclasses of it); the work is done by
the libraries, this module adds the checks and one-line errors a command line needs:

- `parse_lora_spec("PATH[:SCALE]") -> (path, scale)` reads one `--lora` argument.
- `load_loras(pipe, [(path, scale), ...]) -> names` loads each local `.safetensors` LoRA with diffusers'
  `load_lora_weights` (diffusers' own format and kohya / A1111 `lora_unet_...` / `lora_te_...` files, which diffusers
  converts itself) and activates them together with `set_adapters`. A file that is missing, not safetensors, has no
  LoRA weights, or does not fit the model is a `UserError` naming the file, and the pipeline is left as it was.
- `load_embeddings(pipe, paths, tokens=None) -> tokens` adds textual-inversion embeddings with diffusers'
  `load_textual_inversion` (diffusers' `learned_embeds.safetensors`, kohya/A1111 `emb_params`, a flattened
  `string_to_param.*`); the token is the file's stem unless given.
- `weighted_prompt_embeds(pipe, prompts, negatives) -> (prompt_embeds, negative_prompt_embeds)` for
  `pipe(prompt_embeds=..., negative_prompt_embeds=...)`, honouring A1111's `(word:1.3)`, `(word)`, `[word]`, with
  the weighting done by compel; `uses_weighting_syntax(text)` tells whether a prompt contains any of that syntax.

Only local files are read, never a hub name, and never a pickle (`.pt`, `.bin`, `.ckpt`): convert those to
safetensors first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ldm_app.errors import UserError

LORA_SCALE_LIMIT = 10.0  # |scale| above this is a typo, not a LoRA strength anyone uses (A1111 users stay within ±2)

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)"
_SCALE_SUFFIX = re.compile(rf"^(?P<path>.*):(?P<scale>{_NUMBER})$", re.IGNORECASE | re.DOTALL)


# ---------------------------------------------------------------------------------------------------------- LoRA


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (PATH, SCALE); SCALE defaults to 1.0. The text after the last colon is a scale only when it
    is a number, so `C:\\loras\\a.safetensors` or `dir:with:colons/a.safetensors` stay whole paths."""
    match = _SCALE_SUFFIX.match(text)
    path, scale = (match["path"], float(match["scale"])) if match else (text, 1.0)
    head, colon, tail = text.rpartition(":")
    if not match and colon and os.path.isfile(head) and not os.path.exists(text):  # FILE:not-a-number
        raise UserError(f"--lora {text!r}: scale {tail!r} is not a number; expected PATH[:SCALE], e.g. {head}:0.8")
    if not path:
        raise UserError(f"--lora {text!r}: no file before the scale; expected PATH[:SCALE]")
    if not math.isfinite(scale) or abs(scale) > LORA_SCALE_LIMIT:
        raise UserError(
            f"--lora {text!r}: scale {match['scale']} is out of range; expected a number from "
            f"-{LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}"
        )
    return path, scale


def _safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names in a local safetensors file, or a UserError saying why it is not one."""
    from safetensors import safe_open

    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{what} {path}: is not a file")
    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"{what} {path}: only .safetensors files are read (pickled .pt/.bin/.ckpt files can run code); "
            "convert it to safetensors first"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError (bad header), OSError
        raise UserError(f"{what} {path}: not a readable safetensors file ({_one_line(e)})") from None


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: the first non-empty line, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_lora_error(error: BaseException, adapter_name: str) -> str:
    """diffusers/peft's reason a LoRA did not load, in one line. A size mismatch's message is a header line plus
    one line per tensor; keep the first tensor's line (without the internal adapter name) and count the rest."""
    text = str(error)
    mismatches = [line.strip() for line in text.splitlines() if line.strip().startswith("size mismatch for ")]
    if mismatches:
        first = re.sub(r"torch\.Size\((\[[^\]]*\])\)", r"\1", mismatches[0].replace(f".{adapter_name}.", "."))
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        return f"its weights do not fit this model's layers: {first.rstrip('.')}{more}"
    if "not found in the base model" in text:  # peft: no module of the model has any of the LoRA's layer names
        return f"none of its layers exists in this model ({_one_line(error)})"
    return _one_line(error)


@contextlib.contextmanager
def _quiet_libraries(records: list | None = None):
    """Silence diffusers'/transformers' logging, progress bars and peft's warnings while loading (we report a failure
    ourselves, in one line); diffusers' warnings are collected into `records` when given."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    diffusers_logger = logging.getLogger("diffusers")
    saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    handler = _Collect(logging.WARNING) if records is not None else None
    # diffusers' own handler shows nothing below CRITICAL; ours (on the same logger) still sees WARNING and up
    diffusers_logging.set_verbosity(logging.WARNING if handler else logging.CRITICAL)
    handler_levels = [(h, h.level) for h in diffusers_logger.handlers]
    for h, _ in handler_levels:
        h.setLevel(logging.CRITICAL)
    if handler:
        diffusers_logger.addHandler(handler)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if handler:
            diffusers_logger.removeHandler(handler)
        for h, level in handler_levels:
            h.setLevel(level)
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def _adapter_names(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def load_loras(pipe, specs: Iterable[tuple[str | Path, float]]) -> list[str]:
    """Load each `(path, scale)` LoRA into `pipe` and make exactly these adapters active with these scales.
    Returns the adapter names. Call it once on a pipeline that has no LoRA loaded (ValueError otherwise).

    On any failure the adapters loaded so far are unloaded again (the pipeline is as before) and a one-line
    `UserError` names the file and what is wrong with it."""
    specs = [(Path(path), float(scale)) for path, scale in specs]
    if not specs:
        return []
    if _adapter_names(pipe):
        raise ValueError(f"load_loras: the pipeline already has LoRA adapters {sorted(_adapter_names(pipe))}")
    names: list[str] = []
    try:
        for index, (path, scale) in enumerate(specs):
            keys = _safetensors_keys(path, "LoRA")
            if not any("lora" in key.lower() for key in keys):
                raise UserError(
                    f"LoRA {path}: has no LoRA weights (no tensor name contains 'lora'; {len(keys)} tensors): "
                    "is it a full model or an embedding?"
                )
            name = f"lora{index}_" + re.sub(r"\W", "_", path.stem)[:40]  # no dots: peft puts it in tensor names
            records: list[logging.LogRecord] = []
            try:
                with _quiet_libraries(records):
                    # a folder + weight_name with local_files_only: diffusers reads the file itself (and its
                    # adapter metadata) and never asks a hub; use_safetensors=True forbids its pickle fallback
                    pipe.load_lora_weights(
                        str(path.parent),
                        weight_name=path.name,
                        adapter_name=name,
                        use_safetensors=True,
                        local_files_only=True,
                    )
            except UserError:
                raise
            except Exception as e:  # peft/torch size mismatch, no matching layer, bad format (ValueError)
                raise UserError(f"LoRA {path}: {_describe_lora_error(e, name)}") from None
            if name not in _adapter_names(pipe):
                raise UserError(f"LoRA {path}: none of its weights matches a layer of this model")
            names.append(name)
            # diffusers only warns when part of a LoRA matches: "... led to unexpected keys found in the model: K1, K2."
            unexpected = [r.getMessage() for r in records if "unexpected keys" in r.getMessage()]
            if unexpected:
                keys = unexpected[0].split("model:", 1)[-1].strip().rstrip(".").split(", ")
                raise UserError(
                    f"LoRA {path}: {len(keys)} of its weights are for layers this model does not have "
                    f"(first: {keys[0][:150]}); it was made for another model"
                )
        pipe.set_adapters(names, [scale for _, scale in specs])
        pipe.adapter_words = lora_words(path for path, _ in specs)
    except BaseException:
        unload_loras(pipe)
        raise
    return names


def lora_words(paths: Iterable[Path]) -> frozenset[str]:
    """The caption words of the LoRAs' training runs (train_ldm.py writes vocabulary.json beside the LoRA file):
    words such as a new concept's name, which the base model's vocabulary lacks but the LoRA learned."""
    from ldm_app.vocabulary import Vocabulary

    known: set[str] = set()
    for path in paths:
        vocabulary = Vocabulary.read(Path(path).parent)
        if vocabulary is not None:
            known |= vocabulary.words
    return frozenset(known)


def unload_loras(pipe) -> None:
    """Undo every LoRA: diffusers removes peft's wrapper layers too, so the modules are the original ones again."""
    if any(True for _ in _adapter_names(pipe)) or _has_peft_layers(pipe):
        with _quiet_libraries():
            pipe.unload_lora_weights()
    pipe.adapter_words = frozenset()


def _has_peft_layers(pipe) -> bool:
    # a load that failed half-way leaves peft wrappers with no adapter in them (diffusers deletes the adapter only)
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [getattr(pipe, name, None) for name in ("unet", "text_encoder")]
    return any(isinstance(m, BaseTunerLayer) for module in modules if module is not None for m in module.modules())


# ------------------------------------------------------------------------------------------- textual inversion


def _embedding_tensor(path: Path) -> torch.Tensor:
    """The embedding vectors (n_vectors x width) of a safetensors textual-inversion file."""
    from safetensors.torch import load_file

    keys = _safetensors_keys(path, "embedding")
    # diffusers' learned_embeds ({token: vectors}) and kohya/A1111's {"emb_params": vectors} have one tensor;
    # A1111's .pt layout {"string_to_param": {"*": vectors}} flattened to safetensors is "string_to_param.*"
    key = keys[0] if len(keys) == 1 else next((k for k in ("emb_params", "string_to_param.*") if k in keys), None)
    if key is None:
        raise UserError(
            f"embedding {path}: expected one tensor, 'emb_params' or 'string_to_param.*', found {len(keys)} tensors "
            f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}): is it a LoRA or an SDXL embedding?"
        )
    tensor = load_file(str(path))[key]
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise UserError(f"embedding {path}: tensor {key!r} has shape {tuple(tensor.shape)}; expected (vectors, width)")
    return tensor


def load_embeddings(pipe, paths: Sequence[str | Path], tokens: Sequence[str | None] | None = None) -> list[str]:
    """Add each textual-inversion embedding to `pipe`'s tokenizer and text encoder; returns the tokens to use in a
    prompt (a multi-vector embedding is written as its one token; diffusers expands it). All files are checked before
    the first is added, and on a failure the ones added are removed again."""
    paths = [Path(p) for p in paths]
    tokens = list(tokens) if tokens is not None else [None] * len(paths)
    if len(tokens) != len(paths):
        raise ValueError(f"load_embeddings: {len(paths)} paths but {len(tokens)} tokens")
    tokens = [token or path.stem for path, token in zip(paths, tokens)]
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    vocab = pipe.tokenizer.get_vocab()
    vectors = []
    for path, token in zip(paths, tokens):
        tensor = _embedding_tensor(path)
        if tensor.shape[-1] != width:
            raise UserError(
                f"embedding {path}: its vectors are {tensor.shape[-1]} wide but this model's text encoder takes "
                f"{width} (made for another model: SD 1.x is 768, SD 2.x 1024)"
            )
        if not token.strip() or any(ch.isspace() for ch in token):
            raise UserError(f"embedding {path}: token {token!r} must be one word without spaces")
        if token in vocab or f"{token}_1" in vocab:
            raise UserError(
                f"embedding {path}: token {token!r} is already a word of this model's tokenizer; rename the file "
                "(the token is its name without .safetensors)"
            )
        if tokens.count(token) > 1:
            raise UserError(f"embedding {path}: token {token!r} is given by more than one embedding")
        vectors.append(tensor)
    loaded: list[str] = []
    try:
        for path, token, tensor in zip(paths, tokens, vectors):
            try:
                with _quiet_libraries():
                    # an in-memory {token: vectors} dict: diffusers' own format, read by us from safetensors above
                    pipe.load_textual_inversion({token: tensor}, token=token)
            except Exception as e:
                raise UserError(f"embedding {path}: {_one_line(e)}") from None
            loaded.append(token)
    except BaseException:
        if loaded:  # each token and its multi-vector companions token_1, token_2, ...
            added = [
                t for t in pipe.tokenizer.get_vocab()
                if any(t == token or re.fullmatch(re.escape(token) + r"_\d+", t) for token in loaded)
            ]
            with _quiet_libraries():
                pipe.unload_textual_inversion(added)
        raise
    return tokens


# --------------------------------------------------------------------------------------------- prompt weighting

# compel (2.5.1 here) parses its own syntax only: `word++`, `(words)1.3`, `.blend()`, `.and()`; it has no A1111
# mode (its maintainer says so in compel issues #5, #15, #16), and in its syntax A1111 prompts mean something else:
# `[word]` and `(word)` are plain text, `(word:1.3)` is not a weight, and `c++` or `well-lit` are weights.
# Rewriting A1111 text into compel's syntax would need compel to escape `+ - . , =`, which its Fragment does not
# undo (only `\( \) \"`). So the translation is done on A1111's side instead: the reading below is A1111's own
# (modules/prompt_parser.py, parse_prompt_attention: the same tokens, 1.1 per (), 1/1.1 per [], (x:w) multiplies,
# unbalanced brackets close at the end, \( \) \[ \] escape) and yields (text, weight) fragments, which are handed to
# compel as its parsed-prompt object. Tokenizing each fragment, weighting, 75-token chunking of long prompts,
# padding the negative to the prompt's length and expanding multi-vector embeddings are all compel's.
# Not supported: A1111's BREAK (it stays a word), [a:b:step] prompt editing and <lora:...> tags (they stay text).
_A1111_TOKENS = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|          # escapes
    \(|\[|                               # openers
    :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|  # :weight)
    \)|]|                                # closers
    [^\\()\[\]:]+|                       # text
    :
    """,
    re.VERBOSE,
)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_a1111_weights(text: str) -> list[tuple[str, float]]:
    """A1111's reading of a prompt: `[(fragment, weight), ...]`, neighbours of equal weight merged."""
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _A1111_TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:] or "\\", 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            fragments.append([token, 1.0])
    for start in round_open:
        multiply(start, _ROUND)
    for start in square_open:
        multiply(start, _SQUARE)
    merged: list[list] = []
    for fragment, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged] or [("", 1.0)]


def uses_weighting_syntax(text: str) -> bool:
    """True when A1111's reading of `text` differs from the plain text: it has a weight, a bracket group (even
    `(word:1.0)`) or an escape, which the plain (unweighted) text encoder would read as literal characters."""
    fragments = parse_a1111_weights(text)
    return any(weight != 1.0 for _, weight in fragments) or "".join(f for f, _ in fragments) != text


def _compel_for(pipe):
    from compel import Compel, DiffusersTextualInversionManager

    # the settings of compel's own SD-1.x wrapper (compel.CompelForSD): final-layer-norm hidden states, like
    # diffusers' encode_prompt (a plain prompt gives exactly the embeddings diffusers would), long prompts chunked
    return Compel(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        textual_inversion_manager=DiffusersTextualInversionManager(pipe),
        truncate_long_prompts=False,
    )


def weighted_prompt_embeds(
    pipe, prompts: str | Sequence[str], negatives: str | Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings of `prompts` and `negatives` (None or "" = unconditional) with A1111 weights applied, padded
    to one length, for `pipe(prompt_embeds=..., negative_prompt_embeds=...)`. Both are (batch, tokens, width), tokens
    a multiple of 77 (long prompts are not truncated). Put a LoRA's text-encoder part in place first: the
    embeddings are computed with the text encoder as it is now."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negatives is None:
        negatives = [""] * len(prompts)
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    compel = _compel_for(pipe)
    embeds = []
    with torch.no_grad(), _quiet_libraries():
        for text in prompts + negatives:
            conjunction = Conjunction([FlattenedPrompt(parse_a1111_weights(text))])
            embeds.append(compel.build_conditioning_tensor_for_conjunction(conjunction)[0])
        embeds = compel.pad_conditioning_tensors_to_same_length(embeds)
    dtype = pipe.text_encoder.dtype
    positive = torch.cat(embeds[: len(prompts)]).to(dtype)
    negative = torch.cat(embeds[len(prompts):]).to(dtype)
    return positive, negative
