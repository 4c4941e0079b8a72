"""One-off: turn open_clip's `bpe_simple_vocab_16e6.txt.gz` into the `vocab.json` + `merges.txt` pair that
transformers' `CLIPTokenizer` reads, so the package ships a real CLIP tokenizer and never downloads one.

    pip download --no-deps open_clip_torch==3.3.0 && unzip -j open_clip_torch-*.whl '*/bpe_simple_vocab_16e6.txt.gz'
    python tools/convert_clip_vocab.py bpe_simple_vocab_16e6.txt.gz ldm_app/assets/tokenizer

The token order follows open_clip's `SimpleTokenizer` (and OpenAI's CLIP), which is the order of SD-1.x's
tokenizer: 256 byte tokens, the same with `</w>`, the 48,894 merges, then `<|startoftext|>`, `<|endoftext|>`.
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    # Written out rather than imported: the same table as OpenAI CLIP / open_clip / GPT-2.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
