"""What every training loop of moekd uses, whatever it trains (a student, SAR's routers):

- order.py       the held-out split and the seeded, resumable batch order
- frame.py       the step frame: run config, metrics, progress, checkpoints every N steps, divergence
- checkpoint.py  resumable step checkpoints, final/, resume points and settings differences
- metrics.py     metrics.jsonl / metrics.csv (and TensorBoard) and the progress bar
- parallel.py    the DDP seam: a rank's share of each batch, gradient sync, combined metrics
"""
