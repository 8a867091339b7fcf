"""flashdispatch in one page: attention on the best device, what ran and why, what the device is.

    PYTHONPATH=src python3 examples/quickstart.py          # from a checkout
    python examples/quickstart.py                          # with flashdispatch installed
    python examples/quickstart.py --device cpu             # force the CPU
"""

import argparse

import torch

import flashdispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    # Half precision where the fused GPU kernels run; float32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # A grouped-query causal problem: 8 query heads share 2 key/value heads. Layout "bhsd":
    # q (batch, query heads, queries, head dim), k and v (batch, kv heads, keys, head dim).
    torch.manual_seed(0)
    batch, heads_q, heads_kv, seqlen, head_dim = 2, 8, 2, 256, 64
    q = torch.randn(batch, heads_q, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads_kv, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, heads_kv, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)

    out, lse = flashdispatch.attention(q, k, v, causal=True, return_lse=True)
    out.float().square().sum().backward()
    print(f"out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} {lse.dtype}, "
          f"q.grad {tuple(q.grad.shape)}, k.grad {tuple(k.grad.shape)}")

    # Check against PyTorch's public SDPA (top-left causal, which equals bottom-right when Nq == Nk).
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.detach().float(), k.detach().float(), v.detach().float(), is_causal=True, enable_gqa=True)
    print(f"max |out - sdpa(float32)| = {(out.float() - expected).abs().max().item():.2e}")

    # Which backend runs the forward and the backward of this call, and why every other one does not.
    print()
    print(flashdispatch.explain(q, k, v, causal=True))

    # The device facts that backends decide support from.
    print()
    print(flashdispatch.capabilities(device))


if __name__ == "__main__":
    main()
