"""Fine-tune the shipped critic so its reward's image gradient points where the truth's does.
For each sample (the placed surface of a generator estimate, its fitted cameras, and t_verts, the
truth-view reward's gradient w.r.t. the vertices, from gradient_matching_prep.py): the critic's reward
of the rendered views, its image gradient g = dr/dV (create_graph, eager attention: sdpa has no double
backward on CPU), pulled back through the render to the vertices, gv = J_render^T g;
loss = 1 - cos(gv, t_verts) + w_keep * (r - r_orig)^2 (keep the verdicts the shipped critic gives).
(An image-space first version, cos(g * mask, (T - V) * mask), was tried on 2 objects only.)
(The shipped recipe is vlm3d_guidance.toy.gradient_matching: the same loss, phases and split in one command.)
Usage: THREADS=2 [INIT=CRITIC_FOLDER] python gradient_matching_train.py DATA[,DATA2] OUT EPOCHS LR [w_keep]
(INIT: start from that critic's weights, e.g. a previous OUT, instead of the shipped critic's; the
keep term then anchors to its rewards. CLASS_REPEAT="table=2,mug=2": those classes' training samples appear that
many times per epoch; the held-out split is unchanged. RENDER_SIZE=280: render at that size (data from
gradient_matching_size_prep.py at the same size). HELD_FROM=280: draw the held-out objects from range(280),
as a run over all 280 objects does, so a run on some classes holds out the same objects.)"""
import sys, time, math, numpy as np, torch
torch.set_num_threads(int(__import__('os').environ.get('THREADS', '1')))
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.toy.models import WEIGHTS_DIR, CRITIC_FOLDER
paths, out, epochs, lr = sys.argv[1].split(','), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
w_keep = float(sys.argv[5]) if len(sys.argv) > 5 else 0.05
rows = [r for p in paths for r in torch.load(p, weights_only=False)]
objs = sorted({r['i'] for r in rows})
split_objs = list(range(int(__import__('os').environ['HELD_FROM']))) if __import__('os').environ.get('HELD_FROM') else objs
rng = np.random.default_rng(0)
held_objs = set(rng.permutation(split_objs)[: max(1, len(split_objs) // 10)].tolist())
train = [k for k, r in enumerate(rows) if r['i'] not in held_objs]
held = [k for k, r in enumerate(rows) if r['i'] in held_objs]
repeat = {c: int(n) for c, n in (kv.split('=') for kv in __import__('os').environ.get('CLASS_REPEAT', '').split(',') if kv)}
train = [k for k in train for _ in range(repeat.get(rows[k]['cls'], 1))]
print(f"{len(rows)} samples of {len(objs)} objects; train {len(train)}, held {len(held)} ({len(held_objs)} objects)", flush=True)
critic = VLMCritic.from_pretrained(str(WEIGHTS_DIR / CRITIC_FOLDER), device="cpu", dtype="float32", attn_implementation="eager")
if __import__('os').environ.get('INIT'):  # the model weights of a previous run (the processor files are the shipped ones)
    from transformers import Qwen2_5_VLForConditionalGeneration
    critic = VLMCritic(Qwen2_5_VLForConditionalGeneration.from_pretrained(
        __import__('os').environ['INIT'], torch_dtype=torch.float32, attn_implementation="eager"), critic.processor)
model = critic.model

import dataclasses
from vlm3d_guidance.toy import TOY_GUIDANCE
from vlm3d_guidance.toy.gradient_matching import matching_cosine
size = int(__import__('os').environ.get('RENDER_SIZE', TOY_GUIDANCE.render_size))
cfg = dataclasses.replace(TOY_GUIDANCE, render_size=size)
def grad_cos(r, create_graph):
    """cosine, in vertex space, of the critic's gradient pulled back through the render with the truth's
    (the package's matching_cosine since it was added; the measured runs had the same lines inline)"""
    return matching_cosine(critic, r, cfg, create_graph)

orig = {}
t0 = time.perf_counter()
for k, r in enumerate(rows):
    with torch.no_grad():
        orig[k] = float(critic.reward(r['V'].float() / 255, r['prompt']))  # V as re-rendered by gm_prep
print(f"original rewards ({time.perf_counter() - t0:.0f} s)", flush=True)

def evaluate(idx):
    cs = [float(grad_cos(rows[k], False)[1].detach()) for k in idx]
    cs = np.array(cs)
    by_step, by_cls = {}, {}
    for k, c in zip(idx, cs):
        by_step.setdefault(rows[k]['step'], []).append(c)
        by_cls.setdefault(rows[k]['cls'], []).append(c)
    print("  held-out by class", {s: round(float(np.mean(v)), 3) for s, v in sorted(by_cls.items())}, flush=True)
    return float(cs.mean()), float((cs > 0).mean()), {s: round(float(np.mean(v)), 3) for s, v in sorted(by_step.items())}

m, p, bs = evaluate(held)
print(f"before: held-out vertex cos {m:+.3f} ({p:.2f} > 0) by step {bs} ({time.perf_counter() - t0:.0f} s)", flush=True)
model.requires_grad_(True); model.train()
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
batch = 8
steps_total = epochs * math.ceil(len(train) / batch)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps_total, pct_start=0.1)
for ep in range(epochs):
    rng.shuffle(train)
    run_cos, run_keep = [], []
    for b0 in range(0, len(train), batch):
        chunk = train[b0:b0 + batch]
        opt.zero_grad(set_to_none=True)
        for k in chunk:
            rew, c = grad_cos(rows[k], True)
            keep = (rew - orig[k]) ** 2
            loss = ((1 - c) + w_keep * keep) / len(chunk)
            loss.backward()
            run_cos.append(float(c.detach())); run_keep.append(float(keep.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        if (b0 // batch) % 25 == 0:
            print(f"  ep {ep} batch {b0 // batch}: train cos {np.mean(run_cos[-200:]):+.3f}, keep {np.mean(run_keep[-200:]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    m, p, bs = evaluate(held)
    print(f"epoch {ep}: train cos {np.mean(run_cos):+.3f}; held-out vertex cos {m:+.3f} ({p:.2f} > 0) by step {bs} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.train()
model.requires_grad_(False); model.eval()
model.save_pretrained(out)
print("saved", out)
