"""Kernels: each Triton kernel sits beside a plain-torch reference of the same signature (kernels/reference.py);
kernels/backend.py is the table the model layers call them through."""
