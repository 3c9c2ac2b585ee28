"""Candidate toy folder: the shipped weights with the guiding critic's model.safetensors replaced by
MODEL's (the matched critic, critic-matched/, since it ships; before that the only critic, critic/),
manifest hashes updated. Usage: python gradient_matching_candidate.py MODEL_DIR OUT_DIR"""
import sys, json, shutil
from pathlib import Path
from vlm3d_guidance.toy.models import WEIGHTS_DIR, CRITIC_FOLDER, MATCHED_CRITIC_FOLDER, MANIFEST, sha256
model, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(WEIGHTS_DIR, out)
folder = MATCHED_CRITIC_FOLDER if (out / MATCHED_CRITIC_FOLDER).is_dir() else CRITIC_FOLDER
shutil.copy(model / "model.safetensors", out / folder / "model.safetensors")
m = json.loads((out / MANIFEST).read_text())
for rel in m["files"]:
    m["files"][rel] = sha256(out / rel)
m["candidate"] = f"{folder} fine-tuned by benchmarks/toy_experiments/gradient_matching_train.py -> {model}"
(out / MANIFEST).write_text(json.dumps(m, indent=2))
print("candidate", out, "critic replaced:", folder)
