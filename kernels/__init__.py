"""Attention and GEMM kernels: each Triton kernel sits beside a plain-torch reference with the same signature."""
