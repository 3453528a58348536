"""The small Python API shared by chat and perplexity: load, generate (a token iterator), logits."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from runtime.load import Folder, ModelError
from runtime.load import load as open_folder
from runtime.model import Transformer


@dataclass
class Model:
    folder: Folder
    net: Transformer
    tokenizer: object
    device: str
    pos: int = 0                           # tokens already in the KV cache

    @property
    def eos_id(self) -> int:
        return self.folder.config.get("eos_token_id", 1)

    def reset(self) -> None:
        self.pos = 0


def load(path, device: str = "auto", threads: int | None = None, max_len: int = 4096,
         allow_unverified: bool = False, act_terms: int = 2, slots: int = 1, chunk: int = 2048,
         gpu_memory: float | None = None) -> Model:
    """`act_terms` (GPU FP8 kernels only): activations in 2 e4m3 terms (default: ~7 bits, passes the CPU path's
    accuracy bars; decode costs about the same) or 1 (DeepSeek's own scheme; prefill GEMMs up to 2x faster).
    `gpu_memory` (GiB): the most GPU memory the model takes in all; routed experts fill what the rest leaves (by
    default all the free memory; runtime.experts.setup_gpu)."""
    if act_terms not in (1, 2):
        raise ModelError(f"act_terms must be 1 or 2, not {act_terms}")
    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"unknown device '{device}' (auto, cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fp8 = device == "cuda" and _fp8_kernels_usable()
    folder = open_folder(path, allow_unverified=allow_unverified)
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(path)))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    net = Transformer(folder, max_len=max_len, threads=threads, device=device, fp8=fp8, act_terms=act_terms,
                      slots=slots, chunk=chunk, gpu_memory=gpu_memory)
    return Model(folder, net, tokenizer, device)


def _fp8_kernels_usable() -> bool:
    """FP8 tensor cores (compute capability >= 8.9) and Triton; otherwise say why, once, and use bf16 weights."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        why = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no FP8 tensor cores"
    else:
        try:
            import triton  # noqa: F401
            return True
        except ImportError:
            why = "Triton is not installed"
    print(f"note: {why}: FP8 weights are dequantized to bf16 at load (twice the GPU memory)", file=sys.stderr)
    return False


def encode(model: Model, text: str) -> list[int]:
    """tokenizer(text)["input_ids"] with BOS first (some tokenizer backends leave it out)."""
    ids = model.tokenizer(text)["input_ids"]
    bos = model.folder.config.get("bos_token_id", 0)
    return ids if ids[:1] == [bos] else [bos] + ids


def logits(model: Model, tokens: list[int]) -> torch.Tensor:
    """One causal pass over `tokens` from an empty cache: (n_tokens, vocab) float32."""
    model.reset()
    out = model.net.forward(torch.tensor(tokens), 0)
    model.pos = len(tokens)
    return out


def sample(logits_row: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    if temperature <= 0:
        return int(logits_row.argmax())
    probs = torch.softmax(logits_row.float() / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p           # the smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


def generate(model: Model, prompt: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
    """Tokens as they come. The cache keeps what came before: pass only the new part of the conversation."""
    if model.pos + len(prompt) + max_new_tokens > model.net.max_len:
        raise ModelError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new does not fit the context of "
                         f"{model.net.max_len - model.pos} tokens left")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    row = model.net.prefill(torch.tensor(prompt), model.pos)[-1]
    model.pos += len(prompt)
    for _ in range(max_new_tokens):
        token = sample(row, temperature, top_p, gen)
        yield token
        if token == model.eos_id:
            return
        row = model.net.forward(torch.tensor([token]), model.pos)[-1]
        model.pos += 1
