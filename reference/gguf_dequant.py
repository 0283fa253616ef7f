"""Reference de-quantisation data for the GGUF reader's tests (kv-models/src/load/tests.rs).

For every block format the Rust reader supports, makes random blocks (random bytes, with every
f16 scale field replaced by a finite random f16 so no block decodes to NaN or inf) and
de-quantises them with the `gguf` package's numpy implementation (llama.cpp's own Python
reference). Writes kv-models/testdata/gguf-dequant.safetensors with, per type NAME:
  NAME.raw       uint8  [bytes]     the blocks as stored in a GGUF file
  NAME.expected  float32 [values]   gguf.quants.dequantize of them

Run (outside the Rust build; its output is committed):
  python -m venv venv && venv/bin/pip install gguf==0.19.0 numpy safetensors
  venv/bin/python reference/gguf_dequant.py
"""

import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from safetensors.numpy import save_file

# Byte offsets of the f16 scale fields inside one block of each format (ggml-common.h).
SCALES = {
    "F32": [],
    "F16": [],
    "BF16": [],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
BLOCKS = 12


def blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    qtype = T[name]
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    if name in ("F32", "F16", "BF16"):
        values = rng.normal(0.0, 2.0, size=BLOCKS * 32).astype(np.float32)
        if name == "F32":
            return values.view(np.uint8)
        if name == "F16":
            return values.astype(np.float16).view(np.uint8)
        # BF16: the top half of each f32 (truncation, as the reader does not round-trip).
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(BLOCKS, block_bytes), dtype=np.uint8)
    for at in SCALES[name]:
        scale = rng.normal(0.0, 0.05, size=BLOCKS).astype(np.float16)
        raw[:, at : at + 2] = scale.view(np.uint8).reshape(BLOCKS, 2)
    return raw.reshape(-1)


def main() -> None:
    rng = np.random.default_rng(20261202)
    out = {}
    for name in SCALES:
        raw = blocks(name, rng)
        qtype = T[name]
        per_block, block_bytes = GGML_QUANT_SIZES[qtype]
        expected = dequantize(raw.reshape(-1, block_bytes), qtype).astype(np.float32).reshape(-1)
        assert np.isfinite(expected).all(), name
        out[f"{name}.raw"] = raw
        out[f"{name}.expected"] = expected
    path = os.path.join(os.path.dirname(__file__), "..", "kv-models", "testdata", "gguf-dequant.safetensors")
    save_file(out, path)
    print(f"wrote {path}: {', '.join(SCALES)}")


if __name__ == "__main__":
    main()
