"""runtime/fp8.py and runtime/fp8_hopper.py (and fp8_quant, which both import) without the runtime package, whose
__init__ loads ggml: so that the GPU benchmarks run on a machine without a ggml build (the device tool's, before
benchmarks/device.sh builds it). Other modules that need no ggml (runtime.attention) import the same way after it.

    from fp8_only import fp8, fp8_hopper          (from a script in benchmarks/)
"""
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "runtime" not in sys.modules:
    pkg = types.ModuleType("runtime")
    pkg.__path__ = [str(ROOT / "runtime")]
    sys.modules["runtime"] = pkg
from runtime import fp8, fp8_hopper  # noqa: E402,F401
