"""Random but valid GGML expert blocks of real DeepSeek-V3 size, for the CPU-expert and layer benchmarks."""
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

HIDDEN, INTER, TOPK = 7168, 2048, 8
# Q4_K_M's routed experts: Q4_K gate/up, Q6_K down (the larger of the down types it uses)
MATS = [("gate", QT.Q4_K, (INTER, HIDDEN)), ("up", QT.Q4_K, (INTER, HIDDEN)), ("down", QT.Q6_K, (HIDDEN, INTER))]
F16_FIELDS = {QT.Q4_K: ([0, 2], 2e-4), QT.Q6_K: ([208], 5e-5)}  # fp16 scale offsets, size: |weights| ~ 0.05


def expert_nbytes(t, shape) -> int:
    block, nbytes = GGML_QUANT_SIZES[t]
    return shape[0] * shape[1] // block * nbytes


def random_expert(t, shape, rng: np.random.Generator) -> np.ndarray:
    """One expert matrix's blocks: random quants, fp16 block scales set to sane sizes (no inf/NaN)."""
    nbytes = GGML_QUANT_SIZES[t][1]
    blocks = rng.integers(0, 256, (expert_nbytes(t, shape) // nbytes, nbytes), np.uint8)
    at, size = F16_FIELDS[t]
    for a in at:
        blocks[:, a:a + 2] = (rng.uniform(0.5, 1.5, (len(blocks), 1)) * size).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)
