"""Flow-matching schedule, KV cache, block-autoregressive streaming sampler, group branching, scene prompts."""
