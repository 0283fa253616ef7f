"""SmolLM2-135M-Instruct side by side: `kv bench` against HF transformers on the same GGUF, in one run.

Measures prefill seconds at each context and decode tokens/s after the longest prefill, full cache,
batch 1, float32 on the CPU, with torch limited to the same thread count as burn's pool (2 on the
project's machine). Each HF cell runs in a fresh process so its peak RSS is its own. Prints one
Markdown table of both sides and their ratios, and writes it with the raw numbers as JSON.

Run (outside the Rust build; needs torch, transformers<5.3, accelerate and gguf from PyPI):
  cargo build --release -p kv-cli && scripts/fetch-assets.sh
  python bench/peer/smollm2.py --kv target/release/kv --contexts 1024,4096 --out runs/peer
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def ids_for(n):
    # The same deterministic stream `kv bench` prefills (kv-cli/src/bench.rs).
    return [32 + (i * 7 + i // 13) % 90 for i in range(n)]


def hf_cell(gguf, context, steps, threads):
    """One HF measurement in this process: prefill `context` tokens, then `steps` decode steps."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder, name = os.path.split(os.path.abspath(gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    x = torch.tensor([ids_for(context)])
    with torch.inference_mode():
        model(x[:, :16], use_cache=True)  # warm-up
        start = time.perf_counter()
        out = model(x, use_cache=True)
        prefill = time.perf_counter() - start
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm-up steps
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"context": context, "prefill_s": prefill, "decode_tokens_per_s": steps / decode, "peak_rss_mib": rss}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kv", default="target/release/kv")
    p.add_argument("--gguf", default=os.path.join(os.environ.get("KV_ASSETS", os.path.expanduser("~/.cache/kv-cache")), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="runs/peer")
    p.add_argument("--hf-cell", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_cell:
        print(json.dumps(hf_cell(a.gguf, int(a.hf_cell), a.steps, a.threads)))
        return
    contexts = [int(c) for c in a.contexts.split(",")]
    os.makedirs(a.out, exist_ok=True)
    ours_dir = os.path.join(a.out, "kv")
    cmd = [a.kv, "bench", "--model", a.gguf, "--contexts", a.contexts, "--prefill", "--steps", str(a.steps), "--out", ours_dir]
    print("$", " ".join(cmd), file=sys.stderr)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ours_wall = time.perf_counter() - start
    ours = {c["context"]: c for c in json.load(open(os.path.join(ours_dir, "bench.json")))["decode"]}
    theirs = {}
    for c in contexts:
        out = subprocess.run([sys.executable, __file__, "--gguf", a.gguf, "--steps", str(a.steps), "--threads", str(a.threads), "--hf-cell", str(c)], check=True, capture_output=True, text=True)
        theirs[c] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch
    import transformers

    rows = []
    md = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to f32), batch 1, {a.threads} threads; kv: flex backend; HF: transformers {transformers.__version__}, torch {torch.__version__}, SDPA",
        "",
        "| context | kv prefill s | HF prefill s | kv / HF | kv decode tok/s | HF decode tok/s | kv / HF | kv prefill peak MiB (heap) | HF peak RSS MiB (process) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in contexts:
        o, t = ours[c], theirs[c]
        row = {
            "context": c,
            "kv_prefill_s": o["prefill_ms"] / 1e3,
            "hf_prefill_s": t["prefill_s"],
            "kv_decode_tokens_per_s": o["tokens_per_s"],
            "hf_decode_tokens_per_s": t["decode_tokens_per_s"],
            "kv_prefill_peak_mib": o.get("prefill_peak_mib"),
            "hf_peak_rss_mib": t["peak_rss_mib"],
        }
        rows.append(row)
        md.append(
            f"| {c} | {row['kv_prefill_s']:.2f} | {row['hf_prefill_s']:.2f} | {row['kv_prefill_s'] / row['hf_prefill_s']:.2f}x "
            f"| {row['kv_decode_tokens_per_s']:.1f} | {row['hf_decode_tokens_per_s']:.1f} | {row['kv_decode_tokens_per_s'] / row['hf_decode_tokens_per_s']:.2f}x "
            f"| {row['kv_prefill_peak_mib'] or 0:.0f} | {row['hf_peak_rss_mib']:.0f} |"
        )
    md.append("")
    md.append(f"kv bench wall time (load included): {ours_wall:.0f} s")
    text = "\n".join(md)
    print(text)
    with open(os.path.join(a.out, "smollm2.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "smollm2.json"), "w") as f:
        json.dump({"threads": a.threads, "steps": a.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
