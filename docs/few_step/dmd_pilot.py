"""Pilot (2026-12-07, evening; not part of ldm_app): distribution matching (DMD, Yin et al. 2023; DMD2 2024) on the
default model's own 4-step sampler. The student's DPM-Solver++ sample on 999/700/400/100 (gradient through all four
steps) is noised to a random t; the teacher with guidance (the "real" score) and a "fake" score network, trained
online on the student's samples (two updates per student update, after WARMUP alone), each predict x0, and the
sample moves along (fake - real), normalised per sample. Reverse KL is mode-seeking: an attribute the prompt leaves
open should come out as one of its values rather than their average.

    python docs/few_step/dmd_pilot.py STUDENT TEACHER OUT STEPS [GUIDANCE] [LR_G] [FAKE_PER_G] [WARMUP]
    # all captions (runs/gs/dmd_d, ~15 min on 2 cores):
    python docs/few_step/dmd_pilot.py runs/dec/s3d2_model runs/long/cont3d runs/gs/dmd_d 400 1.5 1e-5 2 200
    # free-form captions only, complete ones held to the student (runs/gs/dmd_f, ~16 min):
    FREE_ONLY=1 ANCHOR_U=1 ANCHOR_TMIN=0 ANCHOR_TMAX=1000 python docs/few_step/dmd_pilot.py runs/dec/s3d2_model \
        runs/long/cont3d runs/gs/dmd_f 400 1.5 1e-5 2 200
    # the same with FREE_ONLY=one and OUT runs/gs/dmd_g: the loss on incomplete one-object captions only

Environment: B (batch, 16), LR_F (the fake score's learning rate, 5e-5), SEED, DMD_TMIN (the loss draws t in
[DMD_TMIN, 980]), GRAD_FROM (solver steps before it run without gradient), ANCHOR_U / ANCHOR_TMIN / ANCHOR_TMAX (a
squared error to the frozen student's output on the student's noised samples at t in [TMIN, TMAX)), FREE_ONLY=1
(the loss and the fake on captions that leave an attribute out; the anchor on the complete ones instead, along the
frozen student's own samples), FREE_ONLY=one (the same with only one-object captions that leave an attribute out:
two-object captions, complete or not, go to the anchor). It reads the
captions of runs/long/data5 (v5's last fine-tune) and writes OUT/unet (and OUT/unet_200...): put it in a copy of
STUDENT to sample. Figures: docs/few_step/README.md, "Distribution matching, a pilot".
"""
import copy, json, os, sys, time, random
from pathlib import Path
import torch, torch.nn.functional as F
from ldm_app.pipeline import LatentDiffusionPipeline
from ldm_app.conditioning import encode_text
from ldm_app.samplers import make_scheduler

student_dir, teacher_dir, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
w = float(sys.argv[5]) if len(sys.argv) > 5 else 4.0
lr_g = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-5
fake_per_g = int(sys.argv[7]) if len(sys.argv) > 7 else 2
warmup = int(sys.argv[8]) if len(sys.argv) > 8 else 100
B = int(os.environ.get("B", "16"))
lr_f = float(os.environ.get("LR_F", "5e-5"))
SEED = int(os.environ.get("SEED", "0"))
ANCHOR_U = float(os.environ.get("ANCHOR_U", "0"))  # weight of: G's eps = frozen student's eps at t < ANCHOR_TMAX
ANCHOR_TMAX = int(os.environ.get("ANCHOR_TMAX", "900"))
ANCHOR_TMIN = int(os.environ.get("ANCHOR_TMIN", "0"))  # anchor draws t in [ANCHOR_TMIN, ANCHOR_TMAX)
DMD_TMIN = int(os.environ.get("DMD_TMIN", "20"))  # the distribution-matching loss draws t in [DMD_TMIN, 980]
FREE_ONLY = os.environ.get("FREE_ONLY", "0")  # "1": the loss on incomplete captions, the anchor on complete ones;
# "one": the loss on incomplete one-object captions only, the anchor on all others (complete or two-object)
if FREE_ONLY not in ("0", "1", "one"):
    sys.exit(f"error: FREE_ONLY must be 0, 1 or one, got {FREE_ONLY!r}")
FREE_ONLY = None if FREE_ONLY == "0" else FREE_ONLY
GRAD_FROM = int(os.environ.get("GRAD_FROM", "0"))  # the solver's steps before this index run without gradient
GRID = [999, 700, 400, 100]
torch.set_num_threads(2); torch.manual_seed(SEED); random.seed(SEED)

sp = LatentDiffusionPipeline.from_pretrained(student_dir)
tp = LatentDiffusionPipeline.from_pretrained(teacher_dir)
te, tok = tp.text_encoder.float().eval(), tp.tokenizer
real = tp.unet.float().eval().requires_grad_(False)
fake = copy.deepcopy(real).train().requires_grad_(True)
frozen = sp.unet.float().eval().requires_grad_(False)
G = copy.deepcopy(frozen).train().requires_grad_(True)
abar = tp.scheduler.alphas_cumprod.float()
solver_config = dict(sp.scheduler.config)

captions = [json.loads(l)["text"] for l in open("runs/long/data5/metadata.jsonl")]
canonical = []
if FREE_ONLY:
    from ldm_app.data.shapes import parse_caption

    def held(text):
        """Held to the frozen student: a complete (canonical) caption, every attribute stated (one object: all five;
        two: both objects' size, colour and shape, and the background); with FREE_ONLY=one any two-object caption."""
        p = parse_caption(text)
        two = "objects" in p
        complete = "background" in p and all(len(o) == 3 for o in p["objects"]) if two else len(p) == 5
        return complete or (FREE_ONLY == "one" and two)

    is_held = [held(c) for c in captions]
    canonical = [c for c, h in zip(captions, is_held) if h]
    captions = [c for c, h in zip(captions, is_held) if not h]  # the distribution-matching loss and the fake see these
    print(f"{len(canonical)} captions held to the frozen student, {len(captions)} others (FREE_ONLY={FREE_ONLY})",
          flush=True)
with torch.no_grad():
    c_null = encode_text(tok, te, [""], "cpu")
    # the student's own (pruned) text encoder must give the same states as the teacher's
    probe = captions[:8]
    d = (encode_text(sp.tokenizer, sp.text_encoder.float(), probe, "cpu") - encode_text(tok, te, probe, "cpu")).abs().max()
    print(f"text states student vs teacher max diff {d:.2e}", flush=True)


def solve(unet, x_T, c, grad_from=0):
    sch = make_scheduler("dpm++", solver_config)
    sch.set_timesteps(timesteps=GRID, device="cpu")
    x = x_T * sch.init_noise_sigma
    for i, t in enumerate(sch.timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from):
            out_ = unet(sch.scale_model_input(x, t), t, encoder_hidden_states=c, return_dict=False)[0]
        x = sch.step(out_.float(), t, x).prev_sample
    return x


def x0_from_eps(eps, x_t, t):
    ab = abar[t].view(-1, 1, 1, 1)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def batch(pool=None):
    caps = random.sample(pool or captions, B)
    with torch.no_grad():
        c = encode_text(tok, te, caps, "cpu")
    return c, torch.randn(B, 4, 8, 8)


opt_g = torch.optim.AdamW(G.parameters(), lr=lr_g, betas=(0.9, 0.999), weight_decay=0.0)
opt_f = torch.optim.AdamW(fake.parameters(), lr=lr_f, betas=(0.9, 0.999), weight_decay=0.0)


def fake_step():
    c, x_T = batch()
    with torch.no_grad():
        x = solve(G, x_T, c)
    t = torch.randint(0, 1000, (B,)); n = torch.randn_like(x)
    ab = abar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x + (1 - ab).sqrt() * n
    loss = F.mse_loss(fake(x_t, t, encoder_hidden_states=c).sample, n)
    opt_f.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0); opt_f.step()
    return loss.item()


t0 = time.time()
for i in range(1, warmup + 1):
    lf = fake_step()
    if i % 25 == 0:
        print(f"warmup {i} fake {lf:.4f} {time.time() - t0:.0f}s", flush=True)

for step in range(1, steps + 1):
    for _ in range(fake_per_g):
        lf = fake_step()
    c, x_T = batch()
    x = solve(G, x_T, c, GRAD_FROM)
    t = torch.randint(DMD_TMIN, 981, (B,)); n = torch.randn_like(x)
    ab = abar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * n
        e = real(torch.cat([x_t, x_t]), torch.cat([t, t]),
                 encoder_hidden_states=torch.cat([c_null.expand(B, -1, -1), c]), return_dict=False)[0]
        e_real = e[:B] + w * (e[B:] - e[:B])
        x0_real = x0_from_eps(e_real, x_t, t)
        x0_fake = x0_from_eps(fake(x_t, t, encoder_hidden_states=c).sample, x_t, t)
        norm = (x - x0_real).abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-4)
        grad = (x0_fake - x0_real) / norm
        target = (x - grad).detach()
    loss_dmd = 0.5 * F.mse_loss(x, target)
    loss = loss_dmd
    # the anchor: G held to the frozen student, with FREE_ONLY on complete captions along the frozen student's own
    # samples, else on G's captions and samples
    if ANCHOR_U > 0:
        ca, xa_T = batch(canonical) if FREE_ONLY else (c, None)
        ta = torch.randint(ANCHOR_TMIN, ANCHOR_TMAX, (B,)); na = torch.randn_like(x)
        aba = abar[ta].view(-1, 1, 1, 1)
        with torch.no_grad():
            xs = solve(frozen, xa_T, ca) if FREE_ONLY else x.detach()
            xa = aba.sqrt() * xs + (1 - aba).sqrt() * na
            ea = frozen(xa, ta, encoder_hidden_states=ca).sample
        loss = loss + ANCHOR_U * F.mse_loss(G(xa, ta, encoder_hidden_states=ca).sample, ea)
    opt_g.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(G.parameters(), 1.0); opt_g.step()
    if step % 10 == 0 or step == 1:
        print(f"step {step} dmd {loss_dmd.item():.4f} fake {lf:.4f} |grad| {grad.abs().mean():.3f} "
              f"x std {x.std().item():.3f} {time.time() - t0:.0f}s", flush=True)
    if step % 200 == 0 and step < steps:
        G.save_pretrained(out / f"unet_{step}")
out.mkdir(parents=True, exist_ok=True)
G.save_pretrained(out / "unet")
print("saved", out / "unet", flush=True)
