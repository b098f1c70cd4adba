"""Train the tiny character-level GPT-2 of train_tiny_gpt2.py under FSDP2 on N processes, then
print a sample. On CPUs, with gloo:

    torchrun --nproc-per-node 2 examples/train_fsdp_gpt2.py          # --steps 100 by default

Every transformer block and the root module are sharded with torch.distributed.fsdp.fully_shard:
each rank stores 1/N of the parameters, gradients and AdamW state, and all-gathers a block's
weights just before the block runs. Each rank trains on batches of its own (a different seed per
rank); the reduce-scatter averages the gradients, so N ranks at --batch B train like one process
at batch N*B. The tx_kernels operators only ever see the gathered, ordinary tensors.

On GPUs the same script runs with NCCL, one process per GPU (tx_kernels built with CUDA):

    torchrun --nproc-per-node 8 examples/train_fsdp_gpt2.py --device cuda --bf16
    # several machines: add --nnodes M --node-rank R --rdzv-endpoint HOST:PORT on each

--device cuda picks the NCCL backend and GPU LOCAL_RANK for each process; --bf16 computes in
bf16 over fp32 sharded parameters, with gradients reduced in fp32
(MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)). --compile compiles each block
(torch.compile), --checkpoint recomputes each block's activations in the backward (dropout draws
the same masks again).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tx_kernels.models import GPT2Config, GPT2LMHeadModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_gpt2 import load_text  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    ap.add_argument("--block", type=int, default=64, help="context length in characters")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 parameters and gradient reduction")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-chars", type=int, default=200)
    args = ap.parse_args()

    if "RANK" not in os.environ:
        sys.exit("run me with torchrun, e.g.: torchrun --nproc-per-node 2 examples/train_fsdp_gpt2.py")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # The CPU's cores are shared by the N processes.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (world,))
    say = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(args.seed)  # the same initial weights on every rank before sharding
    chars, stoi, data = load_text()
    config = GPT2Config(vocab_size=len(chars), n_positions=args.block, n_embd=128, n_layer=3, n_head=4,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2LMHeadModel(config).to(device)
    say(f"GPT-2 with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {world} ranks")

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else \
        MixedPrecisionPolicy()
    for block in model.transformer.h:
        if args.checkpoint:
            forward = block.forward
            block.forward = lambda *a, forward=forward: checkpoint(forward, *a, use_reentrant=False)
        fully_shard(block, mesh=mesh, mp_policy=policy)
        if args.compile:
            block.compile()
    fully_shard(model, mesh=mesh, mp_policy=policy)  # embeddings, final LayerNorm, tied LM head
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)  # then cosine decay; unlike OneCycleLR, valid for any --steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))

    batches = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own data
    torch.manual_seed(args.seed * 1000 + rank)  # and its own dropout masks
    start = time.time()
    for step in range(args.steps):
        ix = torch.randint(0, len(data) - args.block, (args.batch,), generator=batches)
        batch = torch.stack([data[i:i + args.block] for i in ix]).to(device)
        loss, _ = model(batch, labels=batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the norm of the whole, sharded gradient
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            say(f"step {step:4d}  loss {mean.item() / world:.3f}")
    say(f"trained {args.steps} steps in {time.time() - start:.1f} s")

    # Every rank takes part in generation: each forward all-gathers the blocks' weights. The same
    # generator on every rank keeps the sampled tokens, and so the collectives, in step.
    prompt = torch.tensor([[stoi[c] for c in "To be"]], device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    n = min(args.sample_chars, config.n_positions - prompt.shape[1])
    out = model.generate(prompt, max_new_tokens=n, do_sample=True, temperature=0.8, top_k=10, generator=g)
    say("-" * 60)
    say("".join(chars[i] for i in out[0].tolist()))
    dist.barrier()  # ranks leave together: gloo aborts a peer torn down mid-collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
