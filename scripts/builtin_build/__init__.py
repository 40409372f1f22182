"""The pieces of scripts/build_builtin.py (the entry point: command line, `--what all`, dispatch).

One concern per module, in the order a build runs:

* runtime.py    — devices, progress lines, library versions, the command and JSON every record cites
* data.py       — the training set: loaded from --data or rebuilt, described in dataset.json
* networks.py   — the UNet and CLIP configurations, the timings that chose them, `--what steptime`
* training.py   — the loop both trainings share (warm-up, clipping, stop rules, progress, record)
* train_ddpm.py — the DDPM and its oracle: set-up, exact checkpoint/resume (training_state.pt), save
* train_clip.py — the CLIP scorer: captions, contrastive training, save
* evaluate.py   — evaluation of what was built (through retrack.evaluation), the v2 criteria,
                  `--what snapshot` of checkpoints and `--what describe`
* cards.py      — the README.md model cards, rendered from each folder's retrack.json
"""
