"""(Ad-hoc, run with the pairwise patch's stage cache at /work/toyrun/work6; see README.md here.)
Does the critic fit intact/broken pairs better when the same views are shown at 2x size?
Fine-tunes the shipped v3.1 critic on the 288 pairs (logistic + ranking loss, as the pairwise patch),
3 epochs, lr 1e-4, 90/10 split by pair (seed 0); views at 140 px (as cached) or upsampled to 280 px
(no new information: only the part's size relative to Qwen's 14-px patches changes)."""
import sys, time, numpy as np, torch, torch.nn.functional as F
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.toy.models import WEIGHTS_DIR, CRITIC_FOLDER
torch.set_num_threads(1)
size = int(sys.argv[1]); epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
d = torch.load('/work/toyrun/work6/critic_data.pt', weights_only=False)
S, P = d['samples'], d['pairs']
rng = np.random.default_rng(0); order = rng.permutation(len(P)); held = [P[k] for k in order[:29]]; train = [P[k] for k in order[29:]]
critic = VLMCritic.from_pretrained(str(WEIGHTS_DIR / CRITIC_FOLDER), device="cpu", dtype="float32")
model = critic.model
def views(i):
    x = S[i][0].float() / 255
    return x if size == 140 else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
@torch.no_grad()
def ranked(pairs):
    return float(np.mean([float(critic.reward(views(a), S[a][1])) > float(critic.reward(views(b), S[b][1])) for a, b in pairs]))
t = time.perf_counter()
print(size, "before: train pairs ranked", round(ranked(train), 3), "held", round(ranked(held), 3), flush=True)
model.requires_grad_(True); model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
for ep in range(epochs):
    rng.shuffle(train)
    for k, (a, b) in enumerate(train):
        ra, rb = critic.reward(views(a), S[a][1]), critic.reward(views(b), S[b][1])
        loss = F.binary_cross_entropy_with_logits(ra, torch.tensor(1.0)) + F.binary_cross_entropy_with_logits(rb, torch.tensor(0.0)) + F.softplus(rb - ra)
        (loss / 4).backward()
        if k % 4 == 3:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    model.eval()
    print(size, f"epoch {ep}: train pairs ranked", round(ranked(train), 3), "held", round(ranked(held), 3), f"({time.perf_counter() - t:.0f} s)", flush=True)
    model.train()
model.requires_grad_(False); model.eval()
model.save_pretrained(f"/work/exp/v6/ft{size}")
