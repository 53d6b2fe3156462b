"""Student-Aware Router (docs/methods.md §3): train the teacher's routers with the student's feedback.

router_file.py  the trained router weights as safetensors, their metadata, loading them into a teacher
objective.py    the teacher's loss terms (divergence to the student, load balance) and the student's
options.py      the settings of `moekd sar train`
train.py        the training loop
"""
