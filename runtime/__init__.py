"""Serve a verified merged DeepSeek-V3 folder (docs/FORMAT.md): FP8 layers on the GPU or CPU, experts on the CPU.

    import runtime
    model = runtime.load("out/tiny-deepseek-v3")
    for token in runtime.generate(model, prompt_ids, max_new_tokens=64): ...
    logits = runtime.logits(model, token_ids)          # (n_tokens, vocab) float32
"""
from runtime.api import Model, generate, load, logits  # noqa: F401
