"""``gradmem-fast demo``: write a few documents into memory vectors and watch the loss fall.

This version uses a tiny randomly initialised Llama-style model built on the spot (no download), so it
runs anywhere in seconds: it shows the write loop, not language understanding.
"""
import time

import torch

from .config import WriteConfig
from .writer import MemoryWriter


def tiny_random_llama(vocab=256, hidden=64, layers=2, heads=4, seed=0):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def run(steps=30, docs=4, length=24, memory_tokens=4, backend="auto", out=print):
    model = tiny_random_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    lengths = [length - 5 * i for i in range(docs)]
    ids = torch.zeros(docs, length, dtype=torch.long)
    mask = torch.zeros(docs, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
        mask[b, :n] = 1
    cfg = WriteConfig(num_memory_tokens=memory_tokens, steps=steps, lr=0.05, optimizer="adam")
    writer = MemoryWriter(model, cfg, backend=backend)
    out(f"gradmem-fast demo: {docs} random documents of {lengths} tokens -> {memory_tokens} memory vectors each")
    out(f"model: tiny random Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
        f"backend: {writer.backend}, Adam, lr={cfg.lr}, {steps} steps")
    start = time.perf_counter()
    result = writer.write(ids, mask)
    elapsed = time.perf_counter() - start
    out("step  " + "  ".join(f"loss[{b}]" for b in range(docs)) + "   mean |g|")
    for k in range(steps):
        if k < 3 or k % 5 == 4 or k == steps - 1:
            losses = "  ".join(f"{v:7.3f}" for v in result.losses[k].tolist())
            out(f"{k + 1:4d}  {losses}   {result.grad_norms[k].mean().item():.3e}")
    out(f"memory: {tuple(result.memory.shape)}, {elapsed:.2f} s")
    return result


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="gradmem-fast demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    run(steps=args.steps, backend=args.backend)
    return 0
