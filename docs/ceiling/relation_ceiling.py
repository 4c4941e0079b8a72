"""What an autoencoder lets through of the adherence prompts: their scenes rendered, encoded and decoded (posterior
mode), and scored by both judges like generated images (README, "The default model": the relation ceiling).

    python docs/ceiling/relation_ceiling.py ldm_app/assets/default_model/vae [TWO_OBJECT_PROMPTS]

Prompts: `evaluate ldm`'s own (seed 0), 100 one-object and TWO_OBJECT_PROMPTS (default 200) two-object scenes.
Measured 2026-12-04 on the bundled autoencoder: renders 1.00 / 1.00 one-object, 0.995 / 1.000 relation (CNN /
geometric); reconstructions 0.99 / 0.98 one-object, 0.98 / 0.915 relation.
"""

import sys

import torch
from diffusers import AutoencoderKL

from ldm_app.evaluation.adherence import render, sample_prompts, score
from ldm_app.evaluation.geometry import GeometryJudge
from ldm_app.evaluation.judge import JudgeConfig, load_or_train_judge


def main() -> None:
    folder = sys.argv[1]
    two = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    judge = load_or_train_judge(JudgeConfig(), log=lambda *a: None)
    prompts = sample_prompts(100, two, 0, 64)
    renders = render([p.scene for p in prompts], 64)
    vae = AutoencoderKL.from_pretrained(folder).eval().float()
    with torch.no_grad():
        recon = torch.cat([((vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
                           for x in renders.split(50)])
    for name, images in (("renders", renders), ("reconstructions", recon)):
        cnn, _ = score(judge, prompts, images)
        geo, _ = score(GeometryJudge(), prompts, images)
        print(f"{name}: one-object all attributes {cnn['one_object']['accuracy']['all_attributes']:.3f} / "
              f"{geo['one_object']['accuracy']['all_attributes']:.3f}, relation "
              f"{cnn['two_object']['relation_accuracy']:.3f} / {geo['two_object']['relation_accuracy']:.3f} "
              "(CNN / geometric)")


if __name__ == "__main__":
    main()
