"""Run by test_train under torchrun: trains the tiny config on this rank and reports what it saw and ended with."""

import hashlib
import json
import sys
from pathlib import Path

from medldm.config import load_config
from medldm.train import Trainer

config_path, run_dir, lpips_weights = sys.argv[1:4]
config, root = load_config(config_path)
trainer = Trainer(config, root, Path(run_dir), lpips_weights=lpips_weights, progress=False)
trainer.run("all")
digest = hashlib.sha256()
for stage in ("autoencoder", "diffusion"):  # the live weights each rank holds in memory
    for value in trainer.trained[stage].state_dict().values():
        digest.update(value.detach().float().numpy().tobytes())
batch = trainer.pair_sampler().batch(0, 2)["hr"]
report = {
    "rank": trainer.acc.process_index,
    "world": trainer.acc.num_processes,
    "batch_digest": hashlib.sha256(batch.numpy().tobytes()).hexdigest(),
    "weights": digest.hexdigest(),
}
Path(run_dir, f"rank{report['rank']}.json").write_text(json.dumps(report))
