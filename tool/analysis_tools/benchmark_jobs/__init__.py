"""The jobs of tool/analysis_tools/benchmark.py, one module each, and what they share.

measure (timers, warm-up, peak rate, memory, child processes), flops (model GFLOP), workload (the
models, images and training parts a job times), evaluation (sliding-window test, PyTorch),
exported (the same on an onnxruntime file), release_loop (the release-style loop, for the
speed-up), training (training steps), data (data loading through the real training step),
memory (six-scale test in its own process), accuracy (bf16 against fp32:
tool/analysis_tools/check_bf16.py) and report (the Markdown table).
"""
