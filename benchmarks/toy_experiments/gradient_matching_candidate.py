"""Candidate toy folder: the shipped weights with the critic's model.safetensors replaced by MODEL's,
manifest hashes updated. Usage: python gradient_matching_candidate.py MODEL_DIR OUT_DIR"""
import sys, json, shutil
from pathlib import Path
from vlm3d_guidance.toy.models import WEIGHTS_DIR, CRITIC_FOLDER, MANIFEST, sha256
model, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(WEIGHTS_DIR, out)
shutil.copy(model / "model.safetensors", out / CRITIC_FOLDER / "model.safetensors")
m = json.loads((out / MANIFEST).read_text())
for rel in m["files"]:
    m["files"][rel] = sha256(out / rel)
m["candidate"] = f"critic fine-tuned by benchmarks/toy_experiments/gradient_matching_train.py -> {model}"
(out / MANIFEST).write_text(json.dumps(m, indent=2))
print("candidate", out)
