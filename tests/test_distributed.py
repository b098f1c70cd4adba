"""A tiny tx_kernels GPT-2 under DistributedDataParallel (gloo, 2 CPU processes) gets the same
gradients, and after an optimizer step the same weights, as single-process training on the full batch."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tx_kernels.models import GPT2Config, GPT2LMHeadModel

WORLD = 2


def _config():
    return GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _data():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 61, (2 * WORLD, 12), generator=g)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, init_state, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = GPT2LMHeadModel(_config())
        model.load_state_dict(init_state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ids = _data().chunk(WORLD)[rank]
        loss, _ = ddp(ids, labels=ids)
        loss.backward()  # DDP averages gradients over ranks
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        if rank == 0:
            torch.save({"grads": grads, "state": model.state_dict()}, os.path.join(out_dir, "rank0.pt"))
        # Both ranks leave together: a rank tearing gloo down while its peer still has a pending
        # collective aborts the peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo unavailable")
def test_ddp_gradients_match_single_process():
    torch.manual_seed(0)
    single = GPT2LMHeadModel(_config())
    init_state = {k: v.clone() for k, v in single.state_dict().items()}
    ids = _data()
    # Each rank's loss is a mean over its half; DDP averages the two: equal halves make that the
    # mean of the per-half losses, which is what we compute here.
    loss = sum(single(half, labels=half)[0] for half in ids.chunk(WORLD)) / WORLD
    loss.backward()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    expected_grads = {n: p.grad.clone() for n, p in single.named_parameters()}
    opt.step()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), init_state, out_dir), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(out_dir, "rank0.pt"))
    for n, g in expected_grads.items():
        err = (got["grads"][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-5, f"{n}: gradient rel err {err:.2e}"
    for k, v in single.state_dict().items():
        assert torch.allclose(got["state"][k], v, rtol=1e-5, atol=1e-7), k
