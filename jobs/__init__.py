"""Orchestration: the main job (one whole release in minutes) and the mini reproduction (multi-seed, and the
dense-degradation run along training). Each step calls a project entry point's ``main(cfg)`` in-process;
only DINO training runs as its own process, under ``accelerate launch``."""
