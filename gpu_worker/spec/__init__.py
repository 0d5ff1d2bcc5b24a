"""Speculative decoding's proposers: n-gram prompt lookup, a draft model, a labelled oracle for benches."""
