"""RL core: NFT loss (``nft``), rewards -> advantages -> optimality (``advantages``), rank-disagreement
selective KL (``selective_kl``) and the old-policy / EMA / KL-reference schedules (``schedules``).

Submodules are imported explicitly (``from astrolabe.rl.nft import nft_loss``); this package does not
re-export them, so importing the pure-math modules never pulls in peft or the model stack.
"""
