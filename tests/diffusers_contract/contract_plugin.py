"""pytest plugin that runs diffusers' own pipeline tests (vendored in v0_40/) offline, against another class.

Two adaptations, both to the test *environment*, none to a test:
- diffusers' dummy components load the tokenizer "hf-internal-testing/tiny-random-clip" from the hub. Offline we
  build a 1000-token CLIP BPE tokenizer from our bundled vocabulary instead: CLIP's vocab.json lists the 512 byte
  tokens, then one token per merge in merges.txt order, then the two special tokens, so its first 998 entries and
  first 486 merges are a consistent smaller BPE; the specials get ids 998 and 999 (inside the dummy text encoder's
  vocab_size=1000).
- `CONTRACT_CLASSES="DiffusersClassName=module.OurClass,..."` swaps `pipeline_class` on every test class that uses
  that diffusers class, and registers ours in `diffusers.pipelines` under its name: diffusers' test of
  encode_prompt in isolation finds the class's source by that name (`source_code_parsing_utils.get_ast_tree`).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import tempfile
from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parents[2] / "ldm_app" / "assets" / "tokenizer"
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"
VOCAB_SIZE = 1000


@functools.cache
def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]  # after "#version"
    by_id = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    plain = by_id[: VOCAB_SIZE - 2]
    small = {token: i for i, token in enumerate(plain + ["<|startoftext|>", "<|endoftext|>"])}
    folder = Path(tempfile.mkdtemp(prefix="tiny_clip_"))
    (folder / "vocab.json").write_text(json.dumps(small), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges[: len(plain) - 512]) + "\n",
                                       encoding="utf-8")  # fmt: skip
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def pytest_configure(config):
    from transformers import CLIPTokenizer

    hub_loader = CLIPTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if name == HUB_TOKENIZER:
            return tiny_clip_tokenizer()
        return hub_loader(cls, name, *args, **kwargs)

    CLIPTokenizer.from_pretrained = classmethod(from_pretrained)


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("CONTRACT_CLASSES", "")
    if not spec:
        return
    import diffusers
    import diffusers.pipelines

    swaps = {}
    for pair in spec.split(","):
        theirs, ours = pair.split("=")
        module, _, name = ours.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        setattr(diffusers.pipelines, cls.__name__, cls)
        swaps[getattr(diffusers, theirs)] = cls
    for item in items:
        if item.cls is not None and getattr(item.cls, "pipeline_class", None) in swaps:
            item.cls.pipeline_class = swaps[item.cls.pipeline_class]
