"""Train a small character-level GPT-2 built from tx_kernels on a few KB of Shakespeare, then
print a sample. About a minute on a laptop CPU:

    python examples/train_tiny_gpt2.py            # --steps 250 --device cpu by default

Every attention, LayerNorm (fused with the residual add) and bias+GELU in the model runs in
tx_kernels' kernels; generation uses the model's KV cache.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tx_kernels.models import GPT2Config, GPT2LMHeadModel  # noqa: E402


def progress(iterable, total):
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, ncols=80)
    except ImportError:
        return _SimpleBar(iterable, total)


class _SimpleBar:
    def __init__(self, iterable, total):
        self.iterable, self.total, self.postfix = iterable, total, ""

    def set_postfix_str(self, s):
        self.postfix = s

    def __iter__(self):
        for i, x in enumerate(self.iterable, 1):
            yield x
            done = int(30 * i / self.total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{self.total} {self.postfix}", end="", flush=True)
        print()


def load_text():
    """The bundled text as (characters, char -> id, all ids as one tensor)."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_shakespeare.txt")).read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return chars, stoi, torch.tensor([stoi[c] for c in text], dtype=torch.long)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64, help="context length in characters")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-chars", type=int, default=300)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    chars, stoi, data = load_text()
    print(f"{len(data)} characters, vocabulary of {len(chars)}")

    config = GPT2Config(vocab_size=len(chars), n_positions=args.block, n_embd=128, n_layer=3, n_head=4,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2LMHeadModel(config).to(args.device)
    print(f"GPT-2 with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    start = time.time()
    bar = progress(range(args.steps), args.steps)
    for step in bar:
        ix = torch.randint(0, len(data) - args.block, (args.batch,))
        batch = torch.stack([data[i:i + args.block] for i in ix]).to(args.device)
        loss, _ = model(batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix_str(f"loss {loss.item():.3f}")
    print(f"trained {args.steps} steps in {time.time() - start:.1f} s, final loss {loss.item():.3f}")

    prompt = torch.tensor([[stoi[c] for c in "To be"]], device=args.device)
    g = torch.Generator().manual_seed(args.seed)
    n = min(args.sample_chars, config.n_positions - prompt.shape[1])
    out = model.generate(prompt, max_new_tokens=n, do_sample=True, temperature=0.8, top_k=10, generator=g)
    print("-" * 60)
    print("".join(chars[i] for i in out[0].tolist()))


if __name__ == "__main__":
    main()
