"""Does re-basin make merges better? Small trained models in the real SD1 key layout (issue 12).

Modules: `data` (digits as latents, class prompts), `models` (SD1-layout text encoder + UNet at a
chosen width, LDM <-> diffusers names), `train` (DDPM epsilon training), `measure` (losses along
interpolation lines, loss barrier). `benchmarks/bench_quality.py` runs the whole benchmark.
"""
