"""Pilot (2026-12-07, not part of ldm_app yet): an adversarial term on a guidance-distilled student's first
prediction (x0 at t = 999, from pure noise), so that an attribute the prompt leaves open is drawn as one of its
values rather than as their average; the rest of the student is anchored to itself (MSE to the frozen original at
t < 900). A small projection discriminator on the 8x8x4 latents tells real latents with their caption from the
student's first prediction with that caption and from real latents with another caption (hinge losses).

    python docs/few_step/adversarial_first_step_pilot.py MODEL OUT STEPS LAMBDA [NUM_IMAGES]
    # e.g. runs/dec/s3d2_model runs/gs/add_a 600 0.02 6000   (v5; ~6 min on 2 cores)

It reads the first NUM_IMAGES scenes of runs/long/data5 (v5's last fine-tune data) and writes OUT/unet; put it in a
copy of MODEL to sample. Figures: docs/few_step/README.md, "An adversarial first step".
"""
import copy, json, sys, time, random
from pathlib import Path
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from ldm_app.pipeline import LatentDiffusionPipeline
from ldm_app.conditioning import encode_text

model, out, steps, lam = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
N = int(sys.argv[5]) if len(sys.argv) > 5 else 6000
SEED = int(__import__("os").environ.get("SEED", "0"))
torch.set_num_threads(2); torch.manual_seed(SEED); random.seed(SEED)
pipe = LatentDiffusionPipeline.from_pretrained(model)
vae, te, tok = pipe.vae.float().eval(), pipe.text_encoder.float().eval(), pipe.tokenizer
anchor = pipe.unet.float().eval().requires_grad_(False)
student = copy.deepcopy(anchor).train().requires_grad_(True)
abar = pipe.scheduler.alphas_cumprod.float()
sf = vae.config.scaling_factor
data = Path("runs/long/data5")
rows = [json.loads(l) for l in open(data / "metadata.jsonl")][:N]
t0 = time.time()
with torch.no_grad():
    Z, C = [], []
    for i in range(0, N, 250):
        b = rows[i:i + 250]
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(data / r["file_name"]).convert("RGB"))).permute(2, 0, 1)
                         for r in b]).float() / 127.5 - 1
        Z.append(vae.encode(x).latent_dist.sample() * sf)
        C.append(encode_text(tok, te, [r["text"] for r in b], "cpu"))
    Z, C = torch.cat(Z), torch.cat(C)
print(f"encoded {N} in {time.time() - t0:.0f} s; latents std {Z.std():.3f}, text {tuple(C.shape)}", flush=True)


class D(nn.Module):
    def __init__(self, dim=C.shape[-1]):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1),
                                 nn.LeakyReLU(0.2), nn.Conv2d(128, 256, 4, 2, 1), nn.LeakyReLU(0.2))
        self.text = nn.Sequential(nn.Linear(dim, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256))
        self.out = nn.Linear(256, 1)

    def forward(self, z, c):
        h = self.net(z).sum((2, 3))
        e = self.text(c.mean(1))
        return self.out(h).squeeze(1) + (h * e).sum(1) / 16


d = D()
opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.0, 0.99))
opt_g = torch.optim.Adam(student.parameters(), lr=1e-5, betas=(0.9, 0.999))
B, T999 = 32, torch.full((32,), 999)
a999 = abar[999]


def x0_first(x_T, c):
    eps = student(x_T, T999, encoder_hidden_states=c).sample
    return (x_T - (1 - a999).sqrt() * eps) / a999.sqrt()


t0 = time.time()
for step in range(1, steps + 1):
    idx = torch.randint(0, N, (B,)); z, c = Z[idx], C[idx]
    c_wrong = C[torch.randint(0, N, (B,))]
    x_T = torch.randn(B, 4, 8, 8)
    fake = x0_first(x_T, c)
    # discriminator: real with its caption vs fake, and real with another caption
    ld = (F.relu(1 - d(z, c)).mean() + F.relu(1 + d(fake.detach(), c)).mean()
          + 0.5 * F.relu(1 + d(z, c_wrong)).mean())
    opt_d.zero_grad(); ld.backward(); opt_d.step()
    # generator: fool D at t = 999, stay itself below t = 900
    adv = -d(fake, c).mean()
    t = torch.randint(0, 900, (B,)); n = torch.randn_like(z)
    ab = abar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * z + (1 - ab).sqrt() * n
    with torch.no_grad():
        target = anchor(x_t, t, encoder_hidden_states=c).sample
    anchor_loss = F.mse_loss(student(x_t, t, encoder_hidden_states=c).sample, target)
    lg = anchor_loss + lam * adv
    opt_g.zero_grad(); lg.backward(); torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0); opt_g.step()
    if step % 25 == 0 or step == 1:
        print(f"step {step} d {ld.item():.3f} adv {adv.item():.3f} anchor {anchor_loss.item():.5f} "
              f"fake std {fake.std().item():.3f} {time.time() - t0:.0f}s", flush=True)
pipe.unet = student.eval()
out.parent.mkdir(parents=True, exist_ok=True)
student.save_pretrained(out / "unet")
print("saved", out / "unet")
