"""The model runner: flat batch tensors, one forward, on-device sampling, decode launches, CUDA graphs."""
