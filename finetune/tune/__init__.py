"""Hyperparameter search on Ray Tune: `python -m finetune tune --config FT.yaml --space SPACE.yaml`.

space.py (the search space and the study's settings, checked before any trial) · trial.py (one trial = one
ordinary engine fine-tune in a subprocess, its evaluations reported to Tune) · study.py (the driver: Tuner,
resume, the best recipe, registration) · report.py (trials table and plots).
"""
