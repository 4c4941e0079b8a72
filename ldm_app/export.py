"""Export a trained pipeline as a lean, shippable model folder.

    python -m ldm_app.export --model RUN_OR_MODEL_DIR --out DIR [--dtype fp16|fp32]

A train_ldm.py output folder holds the pipeline next to checkpoints, logs and the latent cache; the export keeps
only the pipeline (safetensors), its sampling defaults (ldm_app.json) and the training config (run_config.json),
optionally stored in fp16 to halve the size: the bundled default model is such an export. Loading casts back to
float32 unless a dtype is asked for (LatentDiffusionPipeline.from_pretrained), so an fp16 folder runs on the CPU.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

from .errors import ArgumentParser, UserError, run_cli

RUN_CONFIG = "run_config.json"  # the training config train_ldm.py writes: it travels with the model
STORE_DTYPES = ("fp16", "fp32")


def export_model(model: str | Path, out: str | Path, dtype: str = "fp16") -> Path:
    from .fileio import atomic_dir
    from .pipeline import DTYPES, LatentDiffusionPipeline

    if dtype not in STORE_DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
    model, out = Path(model), Path(out)
    if out.resolve() == model.resolve():
        raise UserError("--out must differ from --model")
    pipe = LatentDiffusionPipeline.from_pretrained(model)  # float32, sampling defaults included
    pipe.to(DTYPES[dtype])  # not resolve_device_dtype: storing fp16 from the CPU is fine, running it is not
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
        if (model / RUN_CONFIG).is_file():
            shutil.copy2(model / RUN_CONFIG, tmp / RUN_CONFIG)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m ldm_app.export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a pipeline folder (e.g. a train_ldm.py output folder)")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--dtype", choices=STORE_DTYPES, default="fp16", help="precision of the stored weights")
    args = p.parse_args(argv)
    out = export_model(args.model, args.out, args.dtype)
    print(f"exported {args.model} -> {out} ({folder_bytes(out) / 2**20:.1f} MiB, {args.dtype} weights)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
