"""Serve a verified merged DeepSeek-V3 folder (docs/FORMAT.md): FP8 layers on the GPU or CPU, experts on the CPU.

    import runtime
    model = runtime.load("out/tiny-deepseek-v3")
    for token in runtime.generate(model, prompt_ids, max_new_tokens=64): ...
    logits = runtime.logits(model, token_ids)          # (n_tokens, vocab) float32
"""
# ggml_ops first: it defaults OMP_WAIT_POLICY to PASSIVE, which libgomp reads only when it is loaded, and runtime.api
# imports torch, which loads it. Imported after torch, ggml's OpenMP workers spin (30x slower decode when busy).
from runtime import ggml_ops as _ggml_ops  # noqa: F401  (isort: keep first)
from runtime.api import Model, generate, load, logits  # noqa: E402,F401
