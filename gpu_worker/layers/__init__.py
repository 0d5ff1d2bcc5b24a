"""Model building blocks: projections, fused add + norm, rotary embeddings, attention over the paged cache."""
